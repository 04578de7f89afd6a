from crossfield.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_FIRE: _ClassVar[Optimizer]
    OPTIMIZER_LBFGS: _ClassVar[Optimizer]
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_FIRE: Optimizer
OPTIMIZER_LBFGS: Optimizer

class RelaxSettings(_message.Message):
    __slots__ = ("optimizer", "fmax", "max_steps", "relax_cell", "fixed_atoms", "trajectory_every")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    FMAX_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    RELAX_CELL_FIELD_NUMBER: _ClassVar[int]
    FIXED_ATOMS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_EVERY_FIELD_NUMBER: _ClassVar[int]
    optimizer: Optimizer
    fmax: float
    max_steps: int
    relax_cell: bool
    fixed_atoms: _containers.RepeatedScalarFieldContainer[int]
    trajectory_every: int
    def __init__(self, optimizer: _Optional[_Union[Optimizer, str]] = ..., fmax: _Optional[float] = ..., max_steps: _Optional[int] = ..., relax_cell: _Optional[bool] = ..., fixed_atoms: _Optional[_Iterable[int]] = ..., trajectory_every: _Optional[int] = ...) -> None: ...

class RelaxRequest(_message.Message):
    __slots__ = ("id", "model", "version", "head", "structure", "settings", "allow_extrapolation", "timeout", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    version: str
    head: str
    structure: _inference_pb2.Structure
    settings: RelaxSettings
    allow_extrapolation: bool
    timeout: float
    cancel: bool
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., head: _Optional[str] = ..., structure: _Optional[_Union[_inference_pb2.Structure, _Mapping]] = ..., settings: _Optional[_Union[RelaxSettings, _Mapping]] = ..., allow_extrapolation: _Optional[bool] = ..., timeout: _Optional[float] = ..., cancel: _Optional[bool] = ...) -> None: ...

class RelaxFrame(_message.Message):
    __slots__ = ("step", "structure", "energy", "forces", "stress", "fmax")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STRUCTURE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    FORCES_FIELD_NUMBER: _ClassVar[int]
    STRESS_FIELD_NUMBER: _ClassVar[int]
    FMAX_FIELD_NUMBER: _ClassVar[int]
    step: int
    structure: _inference_pb2.Structure
    energy: float
    forces: _inference_pb2.Array
    stress: _inference_pb2.Array
    fmax: float
    def __init__(self, step: _Optional[int] = ..., structure: _Optional[_Union[_inference_pb2.Structure, _Mapping]] = ..., energy: _Optional[float] = ..., forces: _Optional[_Union[_inference_pb2.Array, _Mapping]] = ..., stress: _Optional[_Union[_inference_pb2.Array, _Mapping]] = ..., fmax: _Optional[float] = ...) -> None: ...

class RelaxResponse(_message.Message):
    __slots__ = ("id", "status", "model", "version", "head", "final", "steps", "converged", "trajectory", "seconds", "extrapolation", "extrapolated_elements")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATION_FIELD_NUMBER: _ClassVar[int]
    EXTRAPOLATED_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: _inference_pb2.Status
    model: str
    version: str
    head: str
    final: RelaxFrame
    steps: int
    converged: bool
    trajectory: _containers.RepeatedCompositeFieldContainer[RelaxFrame]
    seconds: float
    extrapolation: bool
    extrapolated_elements: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[_inference_pb2.Status, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., head: _Optional[str] = ..., final: _Optional[_Union[RelaxFrame, _Mapping]] = ..., steps: _Optional[int] = ..., converged: _Optional[bool] = ..., trajectory: _Optional[_Iterable[_Union[RelaxFrame, _Mapping]]] = ..., seconds: _Optional[float] = ..., extrapolation: _Optional[bool] = ..., extrapolated_elements: _Optional[_Iterable[int]] = ...) -> None: ...
