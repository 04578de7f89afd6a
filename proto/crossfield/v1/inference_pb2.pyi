from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]

class Property(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROPERTY_UNSPECIFIED: _ClassVar[Property]
    PROPERTY_ENERGY: _ClassVar[Property]
    PROPERTY_FORCES: _ClassVar[Property]
    PROPERTY_STRESS: _ClassVar[Property]
    PROPERTY_ATOM_ENERGIES: _ClassVar[Property]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT32: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
PROPERTY_UNSPECIFIED: Property
PROPERTY_ENERGY: Property
PROPERTY_FORCES: Property
PROPERTY_STRESS: Property
PROPERTY_ATOM_ENERGIES: Property

class Array(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Structure(_message.Message):
    __slots__ = ("numbers", "positions", "cell", "pbc")
    NUMBERS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    PBC_FIELD_NUMBER: _ClassVar[int]
    numbers: Array
    positions: Array
    cell: Array
    pbc: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, numbers: _Optional[_Union[Array, _Mapping]] = ..., positions: _Optional[_Union[Array, _Mapping]] = ..., cell: _Optional[_Union[Array, _Mapping]] = ..., pbc: _Optional[_Iterable[bool]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message", "poison")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POISON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    poison: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., poison: _Optional[str] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("id", "model", "version", "head", "properties", "structure", "allow_extrapolation")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    version: str
    head: str
    properties: _containers.RepeatedScalarFieldContainer[Property]
    structure: Structure
    allow_extrapolation: bool
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., head: _Optional[str] = ..., properties: _Optional[_Iterable[_Union[Property, str]]] = ..., structure: _Optional[_Union[Structure, _Mapping]] = ..., allow_extrapolation: _Optional[bool] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("id", "status", "model", "version", "head", "energy", "forces", "stress", "atom_energies", "queue_seconds", "compute_seconds", "extrapolation", "extrapolated_elements")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FIELD_NUMBER: _ClassVar[int]
    STRESS_FIELD_NUMBER: _ClassVar[int]
    ATOM_ENERGIES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATED_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    model: str
    version: str
    head: str
    energy: float
    forces: Array
    stress: Array
    atom_energies: Array
    queue_seconds: float
    compute_seconds: float
    extrapolation: bool
    extrapolated_elements: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., head: _Optional[str] = ..., energy: _Optional[float] = ..., forces: _Optional[_Union[Array, _Mapping]] = ..., stress: _Optional[_Union[Array, _Mapping]] = ..., atom_energies: _Optional[_Union[Array, _Mapping]] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., extrapolation: _Optional[bool] = ..., extrapolated_elements: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("start", "step")
    START_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    start: ComputeRequest
    step: SessionStep
    def __init__(self, start: _Optional[_Union[ComputeRequest, _Mapping]] = ..., step: _Optional[_Union[SessionStep, _Mapping]] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("id", "positions", "cell", "properties")
    ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    id: str
    positions: Array
    cell: Array
    properties: _containers.RepeatedScalarFieldContainer[Property]
    def __init__(self, id: _Optional[str] = ..., positions: _Optional[_Union[Array, _Mapping]] = ..., cell: _Optional[_Union[Array, _Mapping]] = ..., properties: _Optional[_Iterable[_Union[Property, str]]] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("name", "level_of_theory", "coverage_known", "elements", "systems")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_OF_THEORY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_KNOWN_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    SYSTEMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    level_of_theory: _struct_pb2.Struct
    coverage_known: bool
    elements: _containers.RepeatedScalarFieldContainer[int]
    systems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., level_of_theory: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., coverage_known: _Optional[bool] = ..., elements: _Optional[_Iterable[int]] = ..., systems: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "latest", "versions", "heads", "default_head", "elements", "cutoff", "dtype", "device", "max_atoms_per_structure", "metadata", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEAD_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATOMS_PER_STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    latest: bool
    versions: _containers.RepeatedScalarFieldContainer[str]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    default_head: str
    elements: _containers.RepeatedScalarFieldContainer[int]
    cutoff: float
    dtype: str
    device: str
    max_atoms_per_structure: int
    metadata: _struct_pb2.Struct
    backend: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., latest: _Optional[bool] = ..., versions: _Optional[_Iterable[str]] = ..., heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ..., default_head: _Optional[str] = ..., elements: _Optional[_Iterable[int]] = ..., cutoff: _Optional[float] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_atoms_per_structure: _Optional[int] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
