"""``relax_many``: relax structures on a server (``Relax``), many in flight over one stream.

The server relaxes everyone's structures together in full batches, so a client sends all
it has (up to ``max_in_flight`` unanswered) and reads answers as structures finish: no
round trip per optimiser step. ASE ``FixAtoms`` constraints travel as fixed atoms. No
torch here: the results are ASE ``Atoms`` with a single-point calculator holding the
final energy, forces and stress.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from crossfield.client.errors import (
    CrossfieldError,
    PoisonStructureError,
    ServerUnavailableError,
    from_rpc_error,
    never_sent,
)
from crossfield.client.results import status_error
from crossfield.v1 import relax_pb2, relax_pb2_grpc
from crossfield.v1.arrays import from_array
from crossfield.v1.messages import structure_message

OPTIMIZERS = {"fire": relax_pb2.OPTIMIZER_FIRE, "lbfgs": relax_pb2.OPTIMIZER_LBFGS}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


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
    """Relax ASE ``structures`` on ``client``'s servers; results as they finish (``index``
    says which). ``timeout``: seconds per structure.

    One stream at a time, to one server. When that server stops, it answers each
    unfinished structure UNAVAILABLE with its last state, and those go on from there on
    the next server (steps and trajectories joined; the optimiser's memory, FIRE's
    velocity or LBFGS's history, starts afresh). When a server goes away without a word,
    its structures start again on the next one, unless they were in flight on
    ``client.retries.poison_after`` servers that went away (PoisonStructureError). Nothing
    is lost silently: a call that fails otherwise answers every structure not yet
    answered, unsent ones included, with its error."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    settings = dict(
        optimizer=OPTIMIZERS[optimizer],
        fmax=fmax,
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
    work = _Work(structures, max_in_flight)
    connection = None
    while not work.finished():
        deadline = None if client.timeout is None else time.monotonic() + client.timeout
        connection = client._servers.pick(deadline, after=connection)
        if connection is None:
            error = ServerUnavailableError("no server reachable", "UNAVAILABLE")
            yield from work.fail_all(error)
            return
        stream = _Stream(work, settings, names, max_steps, client.retries.attempts)
        work.new_round()
        stub = relax_pb2_grpc.RelaxationStub(connection.channel)
        call = stub.Relax(
            stream.requests(),
            metadata=client._metadata,
            wait_for_ready=client._servers.waits_for_ready,
        )
        try:
            for response in call:
                yield from stream.answer(response)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            gone = connection.went_away(error)  # its probe also has `pick` pass a gone one over
            if never_sent(error):  # no connection to send it on: to the next server
                yield from stream.close(error, again=True)
            elif not gone:
                # The server refused the call (or is there and said UNAVAILABLE itself):
                # every structure not yet answered gets the error.
                yield from stream.close(error, again=False)
                yield from work.fail_all(error)
                return
            else:
                limit = client.retries.poison_after
                yield from stream.close(error, again=True, lost=True, limit=limit)
        else:
            yield from stream.close(None, again=False)
        finally:
            call.cancel()


@dataclass(eq=False)
class _Item:
    """One input structure until its result is final, and its progress on servers that
    stopped while it relaxed."""

    index: int
    input: object
    start: object  # where the next server starts: the input, or a stopped server's state
    steps: int = 0
    seconds: float = 0.0
    trajectory: list = field(default_factory=list)
    lost: int = 0  # servers that went away while it was in flight
    stops: int = 0  # servers that answered it UNAVAILABLE (stopping, or unable to run it)


class _Work:
    """The input (read lazily, ``max_in_flight`` unanswered at a time) and the structures
    to send again; shared by the request thread of the stream in use and the reader."""

    def __init__(self, structures: Iterable, max_in_flight: int) -> None:
        self._input = enumerate(structures)
        self._input_done = False
        self._again: deque[_Item] = deque()  # for the stream in use
        self._later: list[_Item] = []  # for the next stream (not the one that gave them up)
        self._slots = threading.Semaphore(max_in_flight)
        self.unanswered = 0  # taken from the input, result not yet given
        self.lock = threading.Lock()

    def finished(self) -> bool:
        with self.lock:
            return self._input_done and not self.unanswered

    def take(self, stream: _Stream) -> _Item | None:
        """The next structure for ``stream`` (again-first), or None when there is none
        or the stream has ended."""
        with self.lock:
            if self._again:
                return stream.register(self._again.popleft())
        self._slots.acquire()  # outside the lock: the reader releases slots
        with self.lock:
            if stream.ended or self._input_done:
                self._slots.release()
                return None
            taken = next(self._input, None)
            if taken is None:
                self._input_done = True
                self._slots.release()
                return None
            self.unanswered += 1
            index, atoms = taken
            return stream.register(_Item(index, atoms, atoms))

    def again(self, item: _Item) -> None:
        with self.lock:
            self._later.append(item)

    def new_round(self) -> None:
        """A new stream starts: it sends what earlier streams gave up, first."""
        with self.lock:
            self._again.extend(sorted(self._later, key=lambda i: i.index))
            self._later.clear()

    def done(self, item: _Item) -> None:
        with self.lock:
            self.unanswered -= 1
        self._slots.release()

    def fail_all(self, error: CrossfieldError) -> Iterator[RelaxResult]:
        """Every structure not yet answered, sent or not, with ``error``."""
        with self.lock:
            self._input_done = True
            items = [*self._again, *self._later]
            self._again.clear()
            self._later.clear()
            rest = list(self._input)
        for item in sorted(items, key=lambda i: i.index):
            self.done(item)
            yield _final(item, RelaxResult(index=item.index, input=item.input, error=error))
        for index, atoms in rest:
            yield RelaxResult(index=index, input=atoms, error=error)


class _Stream:
    """The structures of one Relax call."""

    def __init__(
        self, work: _Work, settings: dict, names: dict, max_steps: int, max_stops: int
    ) -> None:
        self._work = work
        self._max_stops = max_stops
        self._settings = settings
        self._names = names
        self._max_steps = max_steps
        self._pending: dict[str, _Item] = {}
        self.ended = False

    def register(self, item: _Item) -> _Item:  # under work.lock
        self._pending[str(item.index)] = item
        return item

    def requests(self) -> Iterator[relax_pb2.RelaxRequest]:
        while (item := self._work.take(self)) is not None:
            steps = max(1, self._max_steps - item.steps)
            settings = {**self._settings, "max_steps": steps}
            yield relax_request(item.start, str(item.index), settings, self._names)

    def answer(self, response: relax_pb2.RelaxResponse) -> Iterator[RelaxResult]:
        with self._work.lock:
            item = self._pending.pop(response.id)
        result = relax_result(item.index, item.input, response)
        if response.status.code == UNAVAILABLE and item.stops + 1 < self._max_stops:
            # The server is stopping (or could not run it): go on elsewhere, from its last
            # state when it got as far as one evaluation.
            item.stops += 1
            if response.HasField("final"):
                _progress(item, result, response.final.step)
            self._work.again(item)
            return
        self._work.done(item)
        yield _final(item, result)

    def close(
        self,
        error: CrossfieldError | None,
        again: bool,
        lost: bool = False,
        limit: int | None = None,
    ) -> Iterator[RelaxResult]:
        """The call ended: its unanswered structures go ``again`` (``lost``: the server
        went away with them, counted towards poison, up to ``limit``), or get ``error``."""
        with self._work.lock:
            self.ended = True
            left = sorted(self._pending.values(), key=lambda i: i.index)
            self._pending.clear()
        for item in left:
            item.lost += lost
            if again and (not lost or limit is None or item.lost < limit):
                self._work.again(item)
                continue
            if lost:
                error = PoisonStructureError(
                    f"in flight on {item.lost} servers that went away; not sent again",
                    "UNAVAILABLE",
                    "servers went away while it relaxed",
                )
            self._work.done(item)
            yield _final(item, RelaxResult(index=item.index, input=item.input, error=error))


def _progress(item: _Item, result: RelaxResult, step: int) -> None:
    """Keep what a stopped server did: the next one starts from its last evaluated
    state, ``step`` steps on (a step moved on from it, not yet evaluated, is not kept)."""
    item.start = result.atoms
    item.steps += step
    item.seconds += result.seconds
    item.trajectory += result.trajectory[1:] if item.trajectory else result.trajectory


def _final(item: _Item, result: RelaxResult) -> RelaxResult:
    """``result`` with what servers that stopped before did for the same structure."""
    if item.steps:
        result.steps += item.steps
        result.seconds += item.seconds
        result.trajectory = item.trajectory + result.trajectory[1:]
        if result.atoms is None:
            result.atoms = item.start
    return result


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
