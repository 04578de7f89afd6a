"""Build requests from numpy and read responses back into numpy (no torch).

Thin conveniences over the generated messages so that every Python client (ours, tests,
benchmarks) encodes structures the same way; clients in other languages only need the
.proto.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import from_array, to_array

PROPERTIES: dict[str, int] = {
    "energy": inference_pb2.PROPERTY_ENERGY,
    "forces": inference_pb2.PROPERTY_FORCES,
    "stress": inference_pb2.PROPERTY_STRESS,
    "atom_energies": inference_pb2.PROPERTY_ATOM_ENERGIES,
}


def structure_message(
    numbers: Sequence[int] | np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Sequence[bool] | None = None,
) -> inference_pb2.Structure:
    """A Structure message: int32 numbers, float64 positions, cell only when given."""
    message = inference_pb2.Structure(
        numbers=to_array(numbers, dtype="int32"),
        positions=to_array(positions, dtype="float64"),
        pbc=[] if pbc is None else [bool(p) for p in pbc],
    )
    if cell is not None:
        message.cell.CopyFrom(to_array(cell, dtype="float64"))
    return message


def compute_request(
    numbers: Sequence[int] | np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Sequence[bool] | None = None,
    *,
    model: str = "",
    version: str = "",
    head: str = "",
    properties: Iterable[str] = ("energy", "forces"),
    id: str = "",
    allow_extrapolation: bool = False,
) -> inference_pb2.ComputeRequest:
    """A ComputeRequest; ``properties`` by name (keys of ``PROPERTIES``).

    ``allow_extrapolation``: answer (flagged) even for elements outside the head's
    training data, instead of INVALID_ARGUMENT.
    """
    try:
        wanted = [PROPERTIES[name] for name in properties]
    except KeyError as err:
        known = list(PROPERTIES)
        raise ValueError(f"properties: unknown property {err.args[0]!r}; known: {known}") from None
    return inference_pb2.ComputeRequest(
        id=id,
        model=model,
        version=version,
        head=head,
        properties=wanted,
        structure=structure_message(numbers, positions, cell, pbc),
        allow_extrapolation=allow_extrapolation,
    )


def response_results(response: inference_pb2.ComputeResponse) -> dict[str, float | np.ndarray]:
    """The results present in a response: ``energy`` (float) and numpy arrays for
    ``forces``, ``stress`` and ``atom_energies``; only the properties that were sent,
    plus ``extrapolated_elements`` (atomic numbers) when the answer is an extrapolation."""
    results: dict[str, float | np.ndarray] = {}
    if response.extrapolation:
        results["extrapolated_elements"] = np.array(response.extrapolated_elements, dtype=int)
    if response.HasField("energy"):
        results["energy"] = response.energy
    for name in ("forces", "stress", "atom_energies"):
        if response.HasField(name):
            results[name] = from_array(getattr(response, name), field=name)
    return results
