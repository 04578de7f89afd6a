"""Relax the in-flight structures of all clients together, in batches kept full.

One ``RelaxEngine`` per server, with one thread, steps every relaxation in flight in lock
step: it queues one force evaluation per structure at its model version's batcher, waits
for all of them, takes one optimiser step per structure (``relax_optimizers.py`` on the
coordinates of ``relax_cell.py``) and goes round again. A structure that has converged,
run out of steps, failed, been cancelled or passed its deadline leaves at once and the
next queued one takes its place: the structures in flight are bounded by the atom and
edge budget of one batch of their model on a GPU (``BatchLimits``; on a CPU, whose own
batches hold fewer edges, by the GPU's default budget, which the batcher then runs as a
few CPU-sized batches), so that every round is full, as torch-sim's
``InFlightAutoBatcher`` keeps its batch full (bounded by one CPU batch, 64 relaxations of
64-atom crystals would be in flight about 7 at a time).

Why through the batcher rather than a device loop of its own: a relaxation step is then a
Compute request in every respect. Each step is checked as one (``validation.check_request``
on the new positions: coordinates, canonical frame, the graph's cost bound, so a structure
that flies apart or collapses is refused alone, with its last state); its neighbour list
is its own Verlet list (``verlet.py``, as an MD session's), rebuilt by the runner's
``GraphBuilder`` (untrusted work in worker processes beyond the in-process bound) only
when an atom has moved more than half the skin; its batch runs on the device's one runner
thread, which also isolates a structure whose forces are not finite; and Compute traffic
and relaxations share the device through the runner's turns instead of fighting over it.

The engine never touches gRPC: the service (``relax_service.py``) hands it
``Relaxation`` objects and waits on their futures.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import to_array

from .admission import RESOLVE_ATTEMPTS
from .batcher import DEVICE_BUDGETS, BatchLimits
from .errors import (
    ComputeError,
    DeadlineExceededError,
    InvalidArgumentError,
    QueueFullError,
    RequestCancelledError,
    ServeError,
    UnavailableError,
)
from .models import ModelRegistry, ServedModel
from .relax_cell import Coordinates
from .relax_metrics import RelaxMetrics
from .relax_optimizers import OPTIMIZERS, max_force
from .validation import check_request
from .verlet import SKIN, VerletList
from .work import CheckedRequest, StructureResult, WorkItem

log = logging.getLogger(__name__)

MAX_QUEUED = 16384  # relaxations waiting for a place; beyond it RESOURCE_EXHAUSTED
MOLECULE_PROPERTIES = [inference_pb2.PROPERTY_ENERGY, inference_pb2.PROPERTY_FORCES]
PERIODIC_PROPERTIES = [*MOLECULE_PROPERTIES, inference_pb2.PROPERTY_STRESS]


@dataclass(frozen=True)
class Settings:
    """How one structure is relaxed (checked by the service)."""

    optimizer: str = "fire"  # a key of OPTIMIZERS
    fmax: float = 0.05
    max_steps: int = 500
    relax_cell: bool = False
    fixed: tuple[int, ...] = ()
    trajectory_every: int = 0


@dataclass(eq=False)
class Frame:
    """One evaluated state of a relaxation."""

    step: int
    positions: np.ndarray
    cell: np.ndarray | None
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    fmax: float


@dataclass
class Outcome:
    """How a relaxation ended: ``error`` None when it ran (converged or out of steps)."""

    final: Frame | None
    steps: int
    converged: bool
    trajectory: list[Frame]
    served: ServedModel
    head: str
    numbers: np.ndarray
    pbc: tuple[bool, bool, bool]
    extrapolated: tuple[int, ...]
    error: ServeError | None = None


@dataclass(eq=False)
class Relaxation:
    """One structure on its way down; ``future`` gets its ``Outcome``."""

    template: inference_pb2.ComputeRequest  # the checked start: names, numbers, pbc
    checked: CheckedRequest
    served: ServedModel
    settings: Settings
    positions: np.ndarray  # [n, 3] as sent
    cell: np.ndarray | None
    deadline: float | None = None  # time.monotonic()
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    steps: int = 0
    last: Frame | None = None
    trajectory: list[Frame] = field(default_factory=list)
    cancelled: bool = False
    item: WorkItem | None = None  # its force evaluation in flight (engine's thread only)
    verlet: VerletList | None = None  # its neighbour list between steps (the engine's)

    def __post_init__(self) -> None:
        structure = self.checked.structure
        fixed = np.zeros(self.checked.num_atoms, dtype=bool)
        fixed[list(self.settings.fixed)] = True
        self.coordinates = Coordinates(self.positions, self.cell, self.settings.relax_cell, fixed)
        self.optimizer = OPTIMIZERS[self.settings.optimizer]()
        periodic = any(structure.pbc)
        self.properties = PERIODIC_PROPERTIES if periodic else MOLECULE_PROPERTIES

    @property
    def head(self) -> str:
        return self.checked.structure.head

    def outcome(self, error: ServeError | None = None, converged: bool = False) -> Outcome:
        trajectory, last = self.trajectory, self.last
        ended_between = last is not None and (not trajectory or trajectory[-1] is not last)
        if self.settings.trajectory_every and ended_between:
            trajectory = [*trajectory, last]  # the end is always in the trajectory
        return Outcome(
            final=self.last,
            steps=self.steps,
            converged=converged,
            trajectory=trajectory,
            served=self.served,
            head=self.head,
            numbers=self.checked.structure.numbers,
            pbc=self.checked.structure.pbc,
            extrapolated=self.checked.extrapolated_elements,
            error=error,
        )

    def request(self) -> inference_pb2.ComputeRequest:
        """A Compute request for the structure where it is now."""
        template, coordinates = self.template, self.coordinates
        request = inference_pb2.ComputeRequest(
            model=self.served.name,
            version=self.served.version,
            head=self.head,
            properties=self.properties,
            allow_extrapolation=template.allow_extrapolation,
        )
        structure = request.structure
        structure.numbers.CopyFrom(template.structure.numbers)
        structure.positions.CopyFrom(to_array(coordinates.positions, dtype="float64"))
        if coordinates.cell is not None:
            structure.cell.CopyFrom(to_array(coordinates.cell, dtype="float64"))
        structure.pbc.extend(template.structure.pbc)
        return request

    def observe(self, result: StructureResult) -> bool:
        """Take the evaluation of the current state; True when the relaxation is done
        (converged or out of steps), else the optimiser has moved the structure on."""
        coordinates = self.coordinates
        stress = result.stress
        if stress is not None and not np.isfinite(stress).all():
            raise InvalidArgumentError("structure: the model gave a non-finite stress")
        forces = coordinates.forces(result.forces, stress)
        fmax = max_force(forces)
        self.last = Frame(
            self.steps,
            coordinates.positions.copy(),
            None if coordinates.cell is None else coordinates.cell.copy(),
            float(result.energy),
            result.forces,
            stress,
            fmax,
        )
        every = self.settings.trajectory_every
        if every and self.steps % every == 0:
            self.trajectory.append(self.last)
        if fmax < self.settings.fmax:
            return True
        if self.steps >= self.settings.max_steps:
            return True
        coordinates.move(self.optimizer.step(coordinates.x(), forces))
        if not np.isfinite(coordinates.positions).all():
            raise InvalidArgumentError("structure: the optimiser step left non-finite positions")
        self.steps += 1
        return False


class RelaxEngine:
    """The relaxations of one server: a queue, the set in flight, and the thread that
    steps them (see the module docstring)."""

    def __init__(self, registry: ModelRegistry, metrics: RelaxMetrics) -> None:
        self._registry = registry
        self._metrics = metrics
        self._queue: deque[Relaxation] = deque()
        self._active: list[Relaxation] = []
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="relax", daemon=True)
        self._thread.start()

    def submit(self, relaxation: Relaxation) -> None:
        """Queue ``relaxation`` (never blocks): QueueFullError when ``MAX_QUEUED`` wait,
        UnavailableError once closed."""
        with self._cond:
            if self._closed:
                raise UnavailableError("server is shutting down")
            if len(self._queue) >= MAX_QUEUED:
                raise QueueFullError(f"relaxation queue full ({MAX_QUEUED} waiting); retry later")
            self._queue.append(relaxation)
            self._metrics.queued.set(len(self._queue))
            self._cond.notify_all()

    def cancel(self, relaxation: Relaxation) -> None:
        """Stop ``relaxation``: answered CANCELLED with its last state once its evaluation
        in flight (if any) returns, at once if it still waits in the queue. The evaluation
        is not withdrawn from its batcher: a withdrawn future is cancelled without notice
        to ``concurrent.futures.wait``, and one more evaluation costs less than a round
        that waits on it."""
        with self._cond:
            relaxation.cancelled = True
            if relaxation not in self._queue:
                return
            self._queue.remove(relaxation)
            self._metrics.queued.set(len(self._queue))
        self._finish(relaxation, RequestCancelledError("relaxation cancelled"))

    def close(self) -> None:
        """Answer everything UNAVAILABLE with its last state (the client resumes it
        elsewhere from there) and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # -- the engine's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            self._round()
        stopping = UnavailableError(
            "server stopping: resume the relaxation on another server from its last state"
        )
        with self._cond:
            left = self._active + list(self._queue)
            self._active, self._queue = [], deque()
        for relaxation in left:
            self._finish(relaxation, stopping)

    def _admit(self) -> None:
        """Move queued relaxations into flight while each model's batch has room, in
        arrival order per model (under the lock)."""
        atoms: dict[int, int] = {}
        edges: dict[int, int] = {}
        for relaxation in self._active:
            key = id(relaxation.served)
            atoms[key] = atoms.get(key, 0) + relaxation.checked.num_atoms
            edges[key] = edges.get(key, 0) + relaxation.checked.estimated_edges
        blocked: set[int] = set()
        for relaxation in list(self._queue):
            key = id(relaxation.served)
            if key in blocked:
                continue
            max_atoms, max_edges = round_budget(relaxation.served.batcher.limits)
            new_atoms = atoms.get(key, 0) + relaxation.checked.num_atoms
            new_edges = edges.get(key, 0) + relaxation.checked.estimated_edges
            if key in atoms and (new_atoms > max_atoms or new_edges > max_edges):
                blocked.add(key)
                continue
            atoms[key], edges[key] = new_atoms, new_edges
            self._queue.remove(relaxation)
            self._active.append(relaxation)
        self._metrics.queued.set(len(self._queue))
        self._metrics.in_flight.set(len(self._active))

    def _round(self) -> None:
        """One force evaluation and one optimiser step for every relaxation in flight."""
        now = time.monotonic()
        checked = []
        for relaxation in list(self._active):
            error = self._stopped(relaxation, now) or self._check(relaxation)
            if error is not None:
                self._leave(relaxation, error)
            else:
                checked.append(relaxation)
        # Checked first, queued together: an idle device takes what is queued the moment
        # the first item arrives, so queueing while checking would split the round.
        waiting = []
        for relaxation in checked:
            error = self._submit(relaxation)
            if error is not None:
                self._leave(relaxation, error)
            else:
                waiting.append(relaxation)
        concurrent.futures.wait([r.item.future for r in waiting])
        for relaxation in waiting:
            item, relaxation.item = relaxation.item, None
            self._metrics.steps.labels(relaxation.served.name).inc()
            relaxation.checked = item.request  # its latest edge estimate, for admission
            if relaxation.cancelled:
                self._leave(relaxation, RequestCancelledError("relaxation cancelled"))
                continue
            try:
                done = relaxation.observe(item.future.result())
            except ServeError as err:
                self._leave(relaxation, err)
            except Exception as err:  # a bug, or a step scipy could not take: this one alone
                log.exception("a relaxation step failed")
                self._leave(relaxation, ComputeError(f"{type(err).__name__}: {err}"))
            else:
                if done:
                    self._leave(relaxation, None)

    def _stopped(self, relaxation: Relaxation, now: float) -> ServeError | None:
        if relaxation.cancelled:
            return RequestCancelledError("relaxation cancelled")
        if relaxation.deadline is not None and now >= relaxation.deadline:
            return DeadlineExceededError(
                f"deadline passed after {relaxation.steps} steps (last state returned)"
            )
        return None

    def _check(self, relaxation: Relaxation) -> ServeError | None:
        """Check the structure where it is now as a Compute request (its work item), or
        the error that ends it."""
        try:
            checked = check_request(relaxation.served, relaxation.request(), relaxation.head)
        except ServeError as err:
            return err
        relaxation.item = WorkItem(checked, deadline=relaxation.deadline)
        if relaxation.verlet is None:
            relaxation.verlet = VerletList(SKIN, self._metrics.graphs)
        positions = relaxation.coordinates.positions.copy()  # as the optimiser moved them
        relaxation.item.graph_source = partial(
            relaxation.verlet.graph, request=checked, positions=positions
        )
        return None

    def _submit(self, relaxation: Relaxation) -> ServeError | None:
        """Queue the relaxation's work item at its model version; a version retired
        meanwhile hands it to its successor (checked again there)."""
        for _ in range(RESOLVE_ATTEMPTS):
            served = relaxation.served
            try:
                served.batcher.submit(relaxation.item)
                return None
            except UnavailableError as err:
                try:
                    successor = self._registry.resolve(
                        relaxation.template.model, relaxation.template.version
                    )
                except ServeError:
                    return err
                if successor is served:
                    return err
            except ServeError as err:
                return err
            relaxation.served = successor
            error = self._check(relaxation)
            if error is not None:
                return error
        return UnavailableError("model versions changed too often during the relaxation")

    def _leave(self, relaxation: Relaxation, error: ServeError | None) -> None:
        """Take ``relaxation`` out of flight and answer it."""
        with self._cond:
            self._active.remove(relaxation)
            self._metrics.in_flight.set(len(self._active))
        self._finish(relaxation, error)

    def _finish(self, relaxation: Relaxation, error: ServeError | None) -> None:
        converged = error is None and relaxation.last.fmax < relaxation.settings.fmax
        outcome = relaxation.outcome(error, converged)
        label = relaxation.served.name
        if error is None:
            self._metrics.finished.labels(label, "converged" if converged else "unconverged").inc()
            self._metrics.steps_per_relaxation.labels(label).observe(relaxation.steps)
        else:
            self._metrics.finished.labels(label, error.code).inc()
        relaxation.future.set_result(outcome)


def round_budget(limits: BatchLimits) -> tuple[int, int]:
    """Atoms and edges in flight per model: its batch budget, at least a GPU's default."""
    atoms, edges = DEVICE_BUDGETS["accelerator"]
    return max(limits.max_atoms, atoms), max(limits.max_edges, edges)
