"""numpy <-> ``crossfield.v1.Array``: the wire encoding of every array in the API.

An Array is numpy's ``tobytes()`` of a C-contiguous little-endian array plus its dtype and
shape, so both directions are a single memcpy (``np.frombuffer`` does not even copy).
The byte order is the wire's, not the sender's: bytes are always read as little-endian and
decoded to the host's native order (a copy only on a big-endian host), so nothing
downstream (C++ neighbour lists, torch) ever sees a non-native array. A sender that puts
big-endian bytes under FLOAT64 sends different numbers; the server's bounds on coordinates
refuse what that typically gives (values like 1e19).
This module imports no torch: the client package and independent tools use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from crossfield.v1 import inference_pb2

_TO_NUMPY: dict[int, np.dtype] = {
    inference_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    inference_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    inference_pb2.DTYPE_INT64: np.dtype("<i8"),
    inference_pb2.DTYPE_INT32: np.dtype("<i4"),
}
# Keyed by the dtype string ("<f8"): hashing a string is several times faster than a dtype,
# and small arrays (a water molecule) are dominated by such fixed costs.
_FROM_NUMPY: dict[str, int] = {dtype.str: code for code, dtype in _TO_NUMPY.items()}


def to_array(
    values: np.ndarray | Sequence, dtype: np.dtype | str | None = None
) -> inference_pb2.Array:
    """Encode ``values`` (anything ``np.asarray`` accepts) as an Array message.

    ``dtype`` converts first (e.g. ``"float64"``); without it the array's own dtype is
    kept when the wire supports it, and Python ints/floats become int64/float64.
    """
    array = np.asarray(values, dtype=dtype)
    wire = array.dtype.newbyteorder("<")
    code = _FROM_NUMPY.get(wire.str)
    if code is None:
        supported = [d.name for d in _TO_NUMPY.values()]
        raise TypeError(f"cannot encode dtype {array.dtype} as an Array; supported: {supported}")
    # tobytes() writes C order whatever the memory layout; only the byte order needs fixing.
    if array.dtype.str != wire.str:
        array = array.astype(wire)
    return inference_pb2.Array(dtype=code, shape=array.shape, data=array.tobytes())


def from_array(
    message: inference_pb2.Array, field: str = "array", writeable: bool = False
) -> np.ndarray:
    """Decode an Array message into a numpy array of its dtype and shape.

    Raises ``ValueError`` naming ``field`` when the dtype is unset or unknown, a dimension
    is negative, or the byte count does not match the shape. The result is a read-only
    view of the message's bytes unless ``writeable`` asks for a copy.
    """
    dtype = _TO_NUMPY.get(message.dtype)
    if dtype is None:
        raise ValueError(f"{field}.dtype: unset or unknown dtype value {message.dtype}")
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}.shape: negative dimension in {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(message.data) != expected:
        raise ValueError(
            f"{field}.data: {len(message.data)} bytes do not match shape {list(shape)} of "
            f"{dtype.name} ({expected} bytes)"
        )
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    if not dtype.isnative:
        return array.astype(dtype.newbyteorder("="))
    return array.copy() if writeable else array
