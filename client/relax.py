"""``relax_many``: relax structures on a server (``Relax``), many in flight over one stream.

The server relaxes everyone's structures together in full batches, so a client sends all
it has (up to ``max_in_flight`` unanswered) and reads answers as structures finish: no
round trip per optimiser step. ASE ``FixAtoms`` constraints travel as fixed atoms. No
torch here: the results are ASE ``Atoms`` with a single-point calculator holding the
final energy, forces and stress.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from crossfield.client.errors import CrossfieldError, from_rpc_error
from crossfield.client.results import status_error
from crossfield.v1 import relax_pb2, relax_pb2_grpc
from crossfield.v1.arrays import from_array
from crossfield.v1.messages import structure_message

OPTIMIZERS = {"fire": relax_pb2.OPTIMIZER_FIRE, "lbfgs": relax_pb2.OPTIMIZER_LBFGS}


@dataclass
class RelaxResult:
    """One structure's relaxation, or why it stopped.

    ``index`` is its position in the input. ``atoms`` is the last state the server
    evaluated (positions and cell, with energy, forces and stress attached), also when
    the relaxation stopped early (``error`` set: DEADLINE_EXCEEDED, CANCELLED, a step that
    gave non-finite forces...) if it got as far as one evaluation. ``fmax`` is the largest
    generalised force there (ASE's convergence measure, cell included with
    ``relax_cell``).
    """

    index: int
    input: object | None = None  # the structure as given
    atoms: object | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    fmax: float | None = None
    steps: int = 0
    converged: bool = False
    trajectory: list = field(default_factory=list)
    model: str = ""
    version: str = ""
    head: str = ""
    seconds: float = 0.0
    error: CrossfieldError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def relax_many(
    client,
    structures: Iterable,
    *,
    optimizer: str = "fire",
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = False,
    trajectory_every: int = 0,
    timeout: float | None = None,
    model: str | None = None,
    version: str | None = None,
    head: str | None = None,
    max_in_flight: int = 256,
) -> Iterator[RelaxResult]:
    """Relax ASE ``structures`` on one of ``client``'s servers; results as they finish
    (``index`` says which). ``timeout``: seconds per structure. A call that breaks off
    answers what it had in flight with its error (nothing is lost silently)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    settings = dict(
        optimizer=OPTIMIZERS[optimizer],
        fmax=fmax,
        max_steps=max_steps,
        relax_cell=relax_cell,
        trajectory_every=trajectory_every,
    )
    names = dict(
        model=client.model if model is None else model,
        version=client.version if version is None else version,
        head=client.head if head is None else head,
        allow_extrapolation=client.allow_extrapolation,
        timeout=timeout or 0.0,
    )
    slots = threading.Semaphore(max_in_flight)
    pending: dict[str, tuple[int, object]] = {}
    lock = threading.Lock()

    def requests() -> Iterator[relax_pb2.RelaxRequest]:
        for index, atoms in enumerate(structures):
            slots.acquire()
            with lock:
                pending[str(index)] = (index, atoms)
            yield relax_request(atoms, str(index), settings, names)

    connection = client._servers.pick(None)
    stub = relax_pb2_grpc.RelaxationStub(connection.channel)
    call = stub.Relax(requests(), metadata=client._metadata, wait_for_ready=True)
    try:
        for response in call:
            with lock:
                index, atoms = pending.pop(response.id)
            slots.release()
            yield relax_result(index, atoms, response)
    except grpc.RpcError as err:
        error = from_rpc_error(err)
        with lock:
            left = sorted(pending.values(), key=lambda pair: pair[0])
            pending.clear()
        for index, atoms in left:
            yield RelaxResult(index=index, input=atoms, error=error)
    finally:
        call.cancel()


def relax_request(atoms, request_id: str, settings: dict, names: dict) -> relax_pb2.RelaxRequest:
    """A RelaxRequest for ASE ``atoms``; FixAtoms constraints become fixed atoms."""
    periodic = bool(np.any(atoms.pbc))
    structure = structure_message(
        atoms.numbers,
        atoms.positions,
        atoms.cell.array if periodic else None,
        atoms.pbc if periodic else None,
    )
    fixed = sorted(
        {int(i) for c in atoms.constraints if type(c).__name__ == "FixAtoms" for i in c.index}
    )
    return relax_pb2.RelaxRequest(
        id=request_id,
        structure=structure,
        settings=relax_pb2.RelaxSettings(fixed_atoms=fixed, **settings),
        **names,
    )


def relax_result(index: int, atoms, response: relax_pb2.RelaxResponse) -> RelaxResult:
    result = RelaxResult(
        index=index,
        input=atoms,
        steps=response.steps,
        converged=response.converged,
        model=response.model,
        version=response.version,
        head=response.head,
        seconds=response.seconds,
    )
    if response.HasField("status") and response.status.code != 0:
        result.error = status_error(response.status)
    if response.HasField("final"):
        final = response.final
        result.atoms = frame_atoms(atoms, final)
        result.energy, result.fmax = final.energy, final.fmax
        result.forces = from_array(final.forces)
        result.stress = from_array(final.stress) if final.HasField("stress") else None
    result.trajectory = [frame_atoms(atoms, frame) for frame in response.trajectory]
    return result


def frame_atoms(atoms, frame: relax_pb2.RelaxFrame):
    """A copy of ``atoms`` moved to ``frame``, with its energy, forces and stress."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    moved = atoms.copy()
    moved.positions = from_array(frame.structure.positions)
    if frame.structure.HasField("cell"):
        moved.set_cell(from_array(frame.structure.cell), scale_atoms=False)
    stress = from_array(frame.stress) if frame.HasField("stress") else None
    moved.calc = SinglePointCalculator(
        moved,
        energy=frame.energy,
        forces=from_array(frame.forces),
        stress=None if stress is None else full_3x3_to_voigt_6_stress(stress),
    )
    return moved
