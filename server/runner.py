"""Evaluate batches of structures on one device and hand each structure its own result.

One runner per device, with one thread: batches on a device run one after another (two
concurrent batches would only fight over the same cores or GPU), while the batchers of all
models on that device prepare their next graph in parallel. A batch that fails is split in
halves and retried, down to single structures, so only the culprit gets an error; on a GPU
this also turns an out-of-memory batch into smaller ones that fit. Graph building, the
untrusted part, belongs to the runner's ``GraphBuilder`` (``graphs.py``) and its worker
processes; batchers call ``prepare`` to build a job's graph in their own thread. A lone
MD session's step may run in the I/O loop's thread instead (``run_here``, ``inline.py``),
holding the device as any job does.

Where a batch is evaluated is the job's ``evaluator``: the model itself, in this thread, or
(``crossfield serve --model-process``, CPU only) its copy in the runner's model process
(``model_process.py``), so that the model does not share the interpreter lock with the
server's I/O; the runner's thread then waits on a pipe, and everything else stays here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, GraphBatch
from crossfield.model.graph import StructureGraph, collate

from .errors import ComputeError, InvalidArgumentError, RequestCancelledError
from .graph_cost import GraphLimits
from .graphs import GraphBuilder
from .metrics import Metrics
from .model_process import OUTPUTS, ModelProcess
from .work import StructureResult, WorkItem

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """A batch ready to run: items of one model, and their graphs when already built."""

    model: CrossfieldMACE  # graphs are built and collated for it
    label: str  # model name for metrics
    items: list[WorkItem]
    graph: GraphBatch | None = None
    graphs: list[StructureGraph] | None = None  # per item: a failed batch splits them
    version: str = ""  # model version for metrics
    evaluator: Evaluator | None = None  # what evaluates the batch; None: ``model`` itself


def collate_items(
    model: CrossfieldMACE,
    items: Sequence[WorkItem],
    graphs: Sequence[StructureGraph],
    device: torch.device,
) -> GraphBatch:
    """The ragged batch of ``items`` and their graphs, in the model's dtype."""
    config = model.config
    structures = [item.request.structure for item in items]
    return collate(structures, graphs, config.elements, config.head_names, model.dtype, device)


class Evaluator(Protocol):
    """A model as the runner calls it: the model itself, or its copy in a model process
    (``model_process.ProcessModel``)."""

    def __call__(
        self, graph: GraphBatch, compute_forces: bool = ..., compute_stress: bool = ...
    ) -> dict[str, torch.Tensor]: ...


class Source(Protocol):
    """A batcher, as the runner that runs its batches sees it."""

    @property
    def queued(self) -> int:
        """Structures waiting (read without the batcher's lock: a hint, never a promise)."""

    def offer(self) -> None:
        """The device is idle (called from the runner's thread): hand over a batch now if
        one is ready (``Runner.reserve``, then ``Runner.submit``)."""


class _Poke:
    """Put on the job queue to make the runner's thread offer its idle device."""


POKE = _Poke()


class Runner:
    """Runs jobs on ``device`` one at a time, and decides which batcher goes next.

    A job is handed over in two steps: a batcher *reserves* a place (``reserve``), then
    takes its structures and ``submit``s the job. There are two places: the device, and
    one behind the running job, where a batch closed by a full budget while the device is
    busy waits with its graph built (graph building then overlaps the running batch); a
    batcher gets that place only while no other batcher has structures waiting, so one
    busy model cannot keep the device from another.

    Whenever the device becomes idle, the runner's own thread offers it to its batchers in
    turn (``Source.offer``), starting after the one that took it last, and a batcher whose
    structures are ready hands its batch over right there. A batcher whose structures
    become ready while the device is idle (one just queued, a delay that ended) does not
    hand them over itself: it ``poke``s the runner, whose thread then makes the offer. So
    one thread decides who runs next (every batcher gets its turn), a structure reaching
    an idle device wakes exactly one thread, the runner's, and the device goes from one
    batch to the next without waking any.
    """

    def __init__(
        self,
        device: torch.device | str,
        metrics: Metrics,
        graphs: GraphLimits | None = None,
        process: ModelProcess | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.graphs = GraphBuilder(graphs or GraphLimits())
        self.process = process  # where the models evaluate; None: in this thread
        self._metrics = metrics
        self._jobs: queue.SimpleQueue[Job | _Poke | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # places reserved: jobs running, waiting or being assembled
        self._poked = False  # a POKE is on the job queue
        self._sources: list[Source] = []
        self._turn = 0  # which source hears of an idle device first next time (the one
        # after the source that took it last: round robin, so none waits behind the others)
        self.idle_since = 0.0  # time.monotonic() when the last job finished
        self._thread = threading.Thread(
            target=self._loop, name=f"runner-{self.device}", daemon=True
        )
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or reserved: a job handed over now starts at once."""
        return self._pending == 0

    def attach(self, source: Source) -> None:
        """Offer the idle device to ``source`` from now on."""
        with self._lock:
            self._sources.append(source)

    def detach(self, source: Source) -> None:
        with self._lock:
            self._sources.remove(source)

    def poke(self) -> None:
        """Ask the runner's thread to offer the device to its batchers if it is idle
        (from any thread; nothing happens if it is busy or already asked)."""
        with self._lock:
            if self._poked or self._pending:
                return
            self._poked = True
        self._jobs.put(POKE)

    def reserve(self, source: Source | None, idle_only: bool) -> bool:
        """Claim a place for one job of ``source``: the idle device, else (unless
        ``idle_only``) the place behind the running job while no other source has
        structures waiting. False when there is none. Every successful reservation ends
        in ``submit`` or ``release``."""
        with self._lock:
            if self._pending == 0:
                granted = True
            elif idle_only or self._pending >= 2:
                granted = False
            else:
                granted = not self.others_queued(source)
            if granted:
                self._pending += 1
            return granted

    def release(self) -> None:
        """Give back a reservation that found nothing to run."""
        with self._lock:
            self._pending -= 1
        self.poke()

    def prepare(self, job: Job) -> None:
        """Build the job's graphs now, in the caller's thread (overlapping the running
        batch). Items whose graph fails are answered and dropped from the job; if the batch
        cannot be assembled, ``_run`` tries again and isolates the culprit."""
        job.items, job.graphs = self.graphs.build(job.model, job.items)
        if job.items:
            try:
                job.graph = collate_items(job.model, job.items, job.graphs, self.device)
            except Exception as err:
                log.warning("batch of %d structures failed to assemble: %s", len(job.items), err)

    def submit(self, job: Job) -> None:
        """Run ``job`` (its place was reserved) after those handed over before it."""
        if not job.items:  # every structure failed in ``prepare`` and has its answer
            self.release()
            return
        self._jobs.put(job)

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        self.graphs.close()
        if self.process is not None:
            self.process.close()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job is POKE:
                with self._lock:
                    self._poked = False
                self._offer()
                continue
            if all(item.abandoned for item in job.items):
                _cancel(job.items)  # every caller went away while the batch waited
            else:
                self._execute(job)
            self._finished()
            self._offer()

    def run_here(self, job: Job) -> None:
        """Run ``job`` (its place on the idle device reserved) in the calling thread: a
        lone structure on the I/O loop's (``inline.py``). Structures queued meanwhile by
        other threads are then offered the device by the runner's thread, as usual."""
        try:
            self._execute(job)
        finally:
            self._finished()
        if any(source.queued for source in self._sources):
            self.poke()

    def others_queued(self, source: Source) -> bool:
        """Whether a source other than ``source`` has structures waiting (a hint)."""
        return any(other.queued for other in self._sources if other is not source)

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        self._run(job.model, job.evaluator, job.items, job.graph, job.graphs)
        self._record(job, time.monotonic() - start)

    def _finished(self) -> None:
        """The running job is done: the device is idle (unless another place is held)."""
        with self._lock:
            self._pending -= 1
            self.idle_since = time.monotonic()

    def _offer(self) -> None:
        """If the device is idle, offer it to each source in turn until one takes it."""
        with self._lock:
            if self._pending or not self._sources:
                return
            first = self._turn % len(self._sources)
            sources = self._sources[first:] + self._sources[:first]
        for source in sources:
            source.offer()
            if not self.idle:  # taken: the next offer starts after this source
                with self._lock:
                    if source in self._sources:
                        self._turn = self._sources.index(source) + 1
                return

    def _run(
        self,
        model: CrossfieldMACE,
        evaluator: Evaluator | None,
        items: list[WorkItem],
        graph: GraphBatch | None = None,
        graphs: list[StructureGraph] | None = None,
    ) -> None:
        start = time.monotonic()
        if graphs is None:
            items, graphs = self.graphs.build(model, items)
            if not items:
                return
        try:
            if graph is None:
                graph = collate_items(model, items, graphs, self.device)
            results = compute(evaluator or model, graph, items)
        except Exception as err:  # any failure: isolate the structure(s) responsible
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                log.warning("structure failed alone: %s: %s", type(err).__name__, err)
                items[0].future.set_exception(
                    ComputeError(f"evaluation failed: {type(err).__name__}: {err}")
                )
                return
            half = len(items) // 2
            self._run(model, evaluator, items[:half], None, graphs[:half])
            self._run(model, evaluator, items[half:], None, graphs[half:])
            return
        elapsed = time.monotonic() - start
        for item, result in zip(items, results):
            if isinstance(result, Exception):
                item.future.set_exception(result)
                continue
            result.queue_seconds = item.taken - item.enqueued
            result.compute_seconds = elapsed
            item.future.set_result(result)

    def _record(self, job: Job, elapsed: float) -> None:
        m = self._metrics
        m.compute_seconds.labels(job.label, job.version).observe(elapsed)
        m.batch_structures.labels(job.label).observe(len(job.items))
        atoms = sum(item.request.num_atoms for item in job.items)
        m.batch_atoms.labels(job.label).observe(atoms)
        for item in job.items:
            if item.future.exception() is None:
                head = item.request.structure.head
                m.atoms.labels(job.label, head).inc(item.request.num_atoms)
        if self.device.type == "cuda":
            device = str(self.device)
            m.device_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(device))
            m.device_memory.labels(device, "reserved").set(torch.cuda.memory_reserved(device))


def _cancel(items: Sequence[WorkItem]) -> None:
    for item in items:
        item.future.set_exception(RequestCancelledError("request cancelled"))


def compute(
    model: Evaluator, graph: GraphBatch, items: Sequence[WorkItem]
) -> list[StructureResult | Exception]:
    """Evaluate one batch and split the outputs per structure.

    Forces and stress need a backward pass, so they are computed only when some structure
    in the batch asked for them; a structure whose outputs are not finite (atoms on top of
    each other) gets its own error without touching the others.
    """
    wanted = set().union(*(item.request.properties for item in items))
    need_stress = "stress" in wanted
    need_forces = need_stress or "forces" in wanted
    with torch.set_grad_enabled(need_forces):
        out = model(graph, compute_forces=need_forces, compute_stress=need_stress)
    host = {
        name: out[name].detach().to("cpu", torch.float64).numpy() for name in OUTPUTS if name in out
    }
    ptr = graph.ptr.tolist()
    results: list[StructureResult | Exception] = []
    for index, item in enumerate(items):
        atoms = slice(ptr[index], ptr[index + 1])
        properties = item.request.properties
        energy = float(host["energy"][index])
        forces = host["forces"][atoms] if need_forces else None
        if not np.isfinite(energy) or (forces is not None and not np.isfinite(forces).all()):
            results.append(
                InvalidArgumentError(
                    "structure.positions: the model gave non-finite results; "
                    "are two atoms at the same position?"
                )
            )
            continue
        results.append(
            StructureResult(
                energy=energy if "energy" in properties else None,
                forces=forces if "forces" in properties else None,
                stress=host["stress"][index] if "stress" in properties else None,
                atom_energies=host["node_energy"][atoms] if "atom_energies" in properties else None,
            )
        )
    return results
