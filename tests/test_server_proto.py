"""The wire API: committed stubs match the .proto, and the Array encoding round-trips."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import from_array, to_array
from crossfield.v1.messages import compute_request, response_results

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTOS = sorted((PROTO_ROOT / "crossfield" / "v1").glob("*.proto"))


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs grpcio-tools")
def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    well_known = Path(importlib.util.find_spec("grpc_tools").origin).parent / "_proto"
    names = [str(p.relative_to(PROTO_ROOT)) for p in PROTOS]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        *names,
    ]
    assert protoc.main(args) == 0
    fresh = tmp_path / "crossfield" / "v1"
    committed = PROTO_ROOT / "crossfield" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated == sorted(p.name for p in committed.glob("*_pb2*.py*"))
    for name in generated:
        assert filecmp.cmp(committed / name, fresh / name, shallow=False), (
            f"{committed / name} is stale; regenerate it (see crossfield/v1/__init__.py)"
        )


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32"])
@pytest.mark.parametrize("shape", [(0,), (5,), (7, 3), (2, 3, 3), ()])
def test_array_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    values = (np.random.default_rng(0).normal(size=shape) * 100).astype(dtype)
    message = inference_pb2.Array.FromString(to_array(values).SerializeToString())
    decoded = from_array(message)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == shape
    np.testing.assert_array_equal(decoded, values)


def test_array_accepts_big_endian_and_non_contiguous_input() -> None:
    values = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(from_array(to_array(values)), values)


def test_array_rejects_inconsistent_messages() -> None:
    with pytest.raises(ValueError, match="positions.data: 16 bytes do not match shape"):
        from_array(
            inference_pb2.Array(dtype=inference_pb2.DTYPE_FLOAT64, shape=[1, 3], data=b"\0" * 16),
            field="positions",
        )
    with pytest.raises(ValueError, match="cell.dtype"):
        from_array(inference_pb2.Array(shape=[3, 3], data=b"\0" * 72), field="cell")
    with pytest.raises(TypeError, match="cannot encode dtype complex128"):
        to_array(np.zeros(3, dtype=complex))


def test_helpers_import_no_torch() -> None:
    """The client package relies on these helpers staying torch-free."""
    import subprocess

    code = (
        "import sys\n"
        "import crossfield.v1.arrays, crossfield.v1.messages, crossfield.v1.inference_pb2_grpc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compute_request_and_response_results() -> None:
    request = compute_request(
        [8, 1, 1],
        np.zeros((3, 3)),
        np.eye(3) * 5,
        [True] * 3,
        model="m",
        head="h",
        properties=["energy", "stress"],
        id="7",
    )
    wanted = [inference_pb2.PROPERTY_ENERGY, inference_pb2.PROPERTY_STRESS]
    assert list(request.properties) == wanted
    np.testing.assert_array_equal(from_array(request.structure.cell), np.eye(3) * 5)
    with pytest.raises(ValueError, match="unknown property 'virial'"):
        compute_request([1], np.zeros((1, 3)), properties=["virial"])
    response = inference_pb2.ComputeResponse(id="7", energy=-1.5, stress=to_array(np.eye(3)))
    results = response_results(response)
    assert set(results) == {"energy", "stress"} and results["energy"] == -1.5


def _repeated_double_message():
    """A ``repeated double`` message built at run time: the encoding we did not choose."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(
        name="doubles.proto", package="bench", syntax="proto3"
    )
    message = proto.message_type.add(name="Doubles")
    message.field.add(
        name="values",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.Doubles"))


def _best_seconds(function, repeats: int = 5, number: int = 50) -> float:
    import timeit

    return min(timeit.repeat(function, repeat=repeats, number=number)) / number


def test_array_encoding_beats_repeated_double() -> None:
    """Encode + serialise + parse + decode [1000, 3] float64 positions both ways. The
    README quotes these figures; bytes must stay clearly ahead (measured ~7-15x)."""
    doubles = _repeated_double_message()
    positions = np.random.default_rng(0).normal(size=(1000, 3))

    def as_bytes() -> np.ndarray:
        wire = to_array(positions).SerializeToString()
        return from_array(inference_pb2.Array.FromString(wire))

    def as_repeated() -> np.ndarray:
        wire = doubles(values=positions.ravel()).SerializeToString()
        return np.asarray(doubles.FromString(wire).values, dtype=np.float64).reshape(-1, 3)

    np.testing.assert_array_equal(as_bytes(), as_repeated())
    fast, slow = _best_seconds(as_bytes), _best_seconds(as_repeated)
    print(
        f"[1000,3] float64 round trip: Array {fast * 1e6:.1f} us, "
        f"repeated double {slow * 1e6:.1f} us"
    )
    assert slow > 2.0 * fast
