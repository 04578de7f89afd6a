"""ASE ``Atoms`` to requests, and responses to ``Result``.

Property names on this side are ASE's (``energies`` for per-atom energies); the wire
names live in ``crossfield.v1.messages``. Stress is only ever asked for where it is
defined (a periodic structure with a cell spanning 3D), so a screening file that mixes
molecules and crystals can ask for stress once for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from crossfield.client.errors import CrossfieldError, PoisonStructureError, error_for
from crossfield.v1 import inference_pb2
from crossfield.v1.messages import compute_request, response_results

PROPERTIES = ("energy", "forces", "stress", "energies")
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_WIRE_NAMES = {
    "energy": "energy",
    "forces": "forces",
    "stress": "stress",
    "energies": "atom_energies",
}


@dataclass
class Result:
    """What the server computed for one structure, or why it could not.

    ``index`` is the structure's position in the input of ``compute_many``. Arrays are
    float64: ``forces`` [n, 3] eV/A, ``stress`` [3, 3] eV/A^3 (ASE sign convention),
    ``energies`` [n] eV. ``error`` is set (and the properties are None) when the structure
    failed; ``model``, ``version`` and ``head`` say who answered. ``extrapolated_elements``
    (atomic numbers) is non-empty when the request allowed extrapolation and the head was
    not trained on these elements: the numbers are then a guess, flagged as such.
    """

    index: int
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    energies: np.ndarray | None = None
    model: str = ""
    version: str = ""
    head: str = ""
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    error: CrossfieldError | None = None
    extrapolated_elements: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def check_properties(properties: Sequence[str]) -> tuple[str, ...]:
    unknown = [p for p in properties if p not in PROPERTIES]
    if unknown:
        raise ValueError(f"properties: unknown {unknown}; choose from {list(PROPERTIES)}")
    return tuple(dict.fromkeys(properties))


def has_volume(atoms) -> bool:
    """Whether stress is defined: some periodic direction and a cell that spans 3D."""
    return bool(np.any(atoms.pbc)) and abs(float(np.linalg.det(atoms.cell.array))) > 1e-9


def atoms_request(
    atoms,
    properties: Sequence[str],
    *,
    model: str = "",
    version: str = "",
    head: str = "",
    id: str = "",
    allow_extrapolation: bool = False,
) -> inference_pb2.ComputeRequest:
    """A ComputeRequest for ``atoms``; molecules travel without cell and pbc."""
    wanted = [p for p in properties if p != "stress" or has_volume(atoms)]
    periodic = bool(np.any(atoms.pbc))
    return compute_request(
        atoms.numbers,
        atoms.positions,
        atoms.cell.array if periodic else None,
        atoms.pbc if periodic else None,
        model=model,
        version=version,
        head=head,
        properties=[_WIRE_NAMES[p] for p in wanted],
        id=id,
        allow_extrapolation=allow_extrapolation,
    )


def retryable_answer(response: inference_pb2.ComputeResponse, retries) -> bool:
    """Whether a streamed answer is a live server's "not now" (a full queue, shutting
    down) that ``retries`` (a ``RetryPolicy``) sends again rather than reports."""
    if not response.HasField("status") or response.status.code == 0:
        return False
    return _CODE_NAMES.get(response.status.code, "UNKNOWN") in retries.retry_on


def status_error(status: inference_pb2.Status) -> CrossfieldError:
    """The error of one streamed answer's non-OK ``status`` (Compute, sessions, Relax)."""
    code = _CODE_NAMES.get(status.code, "UNKNOWN")
    if status.poison:  # refused as poison: as the unary trailer says (errors.py)
        return PoisonStructureError(status.message or status.poison, code, status.poison)
    return error_for(code, status.message)


def response_result(response: inference_pb2.ComputeResponse, index: int = 0) -> Result:
    """A Result from a response; a non-OK streamed status becomes ``Result.error``."""
    common = {
        "index": index,
        "model": response.model,
        "version": response.version,
        "head": response.head,
        "queue_seconds": response.queue_seconds,
        "compute_seconds": response.compute_seconds,
    }
    if response.HasField("status") and response.status.code != 0:
        return Result(error=status_error(response.status), **common)
    values = response_results(response)
    return Result(
        energy=values.get("energy"),
        forces=values.get("forces"),
        stress=values.get("stress"),
        energies=values.get("atom_energies"),
        extrapolated_elements=tuple(int(z) for z in values.get("extrapolated_elements", ())),
        **common,
    )
