"""Decide which queued structures of one model run together, and when.

A lone client must not wait for batch-mates that are not coming, and a crowd must not be
split into batches of one. So a batch closes:

- at once when the device is idle and the batch-mates it can expect are queued: as many
  structures as the previous batch held, while that batch's callers may still come back
  (for ``max_delay`` after the device went idle); a lone MD client is never held back;
- when the oldest structure has waited ``max_delay`` (the cap on waiting for batch-mates
  that were expected and did not come) and the device is idle;
- when its atom or edge budget is full; if the device is busy, the batch is assembled
  now (graphs built in the batcher's thread, overlapping the running batch) and waits
  in the runner's one place behind it.

While the device is busy nothing else closes a batch: the structures would wait for the
device anyway, so the batch grows instead, and the batcher's thread builds the graphs of
the structures queued for the next batch meanwhile (those proven cheap: ``_unbuilt``), so
that the device does not sit idle while they are built once it is free (for a batch of 16
molecules the device went from ~6 ms of graph building to ~0.3 ms between batches).
Whenever the device becomes idle, the runner's thread offers it to its batchers in turn
(``offer``) and takes a batch that is ready; a batch that becomes ready while the device
is idle (a structure just queued, a delay that ended) pokes the runner's thread to make
that offer (``Runner.poke``). So a structure reaching an idle device wakes one thread, the
runner's, and graph building then happens there. Structures with different heads share a
batch (one backbone pass).

Edges are only known after the neighbour list, so the edge budget is planned with each
structure's estimated edge count (see ``graph_cost.py``); a structure larger than a whole
budget runs alone.

Submitting never blocks: the service runs on an event loop, so a full queue is an error
to the caller, who may ask to be told when there is room (``when_room``) instead of
polling. A withdrawn structure (its caller cancelled, its stream ended) leaves the queue's
counts at once; its entry is skipped when the batcher reaches it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from crossfield.model import CrossfieldMACE

from . import inline
from .errors import (
    DeadlineExceededError,
    QueueFullError,
    RequestCancelledError,
    UnavailableError,
)
from .graph_cost import GraphLimits
from .metrics import Metrics
from .runner import Evaluator, Job, Runner
from .work import WorkItem


@dataclass(frozen=True)
class BatchLimits:
    """Budgets of one batch, the bound of one model's queue, and the per-structure limits
    of graph building. A budget left at None is the device's (``on``)."""

    max_atoms: int | None = None
    max_edges: int | None = None
    max_delay: float = 0.005  # seconds the oldest structure may wait for batch-mates
    max_queue: int = 4096  # structures waiting; beyond it RESOURCE_EXHAUSTED
    graphs: GraphLimits = field(default_factory=GraphLimits)

    def __post_init__(self) -> None:
        for name in ("max_atoms", "max_edges", "max_queue"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.max_delay < 0:
            raise ValueError(f"max_delay: must be >= 0, got {self.max_delay}")

    def on(self, device: torch.device, backend: str = "eager") -> BatchLimits:
        """These limits with the budget of ``device`` running ``backend`` (``DEVICE_BUDGETS``)
        where none was set."""
        kind = "accelerator" if device.type != "cpu" else "cpu, aot" if backend == "aot" else "cpu"
        atoms, edges = DEVICE_BUDGETS[kind]
        return replace(
            self,
            max_atoms=atoms if self.max_atoms is None else self.max_atoms,
            max_edges=edges if self.max_edges is None else self.max_edges,
        )


# Default batch budgets (atoms, edges). A GPU gains from every structure added until its
# memory fills. A CPU core gains only until a batch's tensors leave its caches, beyond a
# few thousand edges, and then every structure costs more, not less; but each batch also
# pays the model call's fixed cost (25-50 ms for the default model eager, 1-3 ms AOT), so
# a CPU budget cannot be small either. Measured for the default model on this project's
# 2-core CPU: 64-atom crystals (1792 edges each) give the same structures/s in batches of
# 1-4 and 13-32 % fewer in batches of 6 and 12 (AOT; 8-14 % eager), and through the server
# 15.8 -> 19.6 structures/s (eager) with a 4096-edge budget; but a relaxation farm of 64
# small structures (9.1k estimated edges a round) ran 10 % slower with an 8192-edge budget,
# which cut each round into two calls, and 34 % slower with 4096. 12288 on a CPU keeps
# such rounds whole and crystals in batches of up to 6. An AOT package's fixed cost is
# small enough that cutting those rounds costs little, while its batches of 6 crystals
# ran at 25.7 and 23.5 structures/s against 35.8 and 36.5 one at a time and 35.5 in pairs
# (in-process, side by side, twice): so 4096 edges for it (batches of 2 such crystals).
DEVICE_BUDGETS = {
    "cpu": (4096, 12288),
    "cpu, aot": (4096, 4096),
    "accelerator": (4096, 131072),
}


class Batcher:
    """The queue and batching thread of one model version."""

    def __init__(
        self,
        model: CrossfieldMACE,
        label: str,
        runner: Runner,
        limits: BatchLimits,
        metrics: Metrics,
        version: str = "",
        evaluator: Evaluator | None = None,
        backend: str = "eager",
    ) -> None:
        self.limits = limits.on(runner.device, backend)
        self._model = model
        self._evaluator = evaluator  # None: the runner calls the model itself
        # A lone structure (``submit(lone=True)``) is evaluated by the model itself when
        # it is eager, even with a model process: the same numbers, without the hop to the
        # child and back (measured 8-10 ms a step for 64 atoms of Cu, ~4.9k edges).
        self._evaluator_alone = None if backend == "eager" else evaluator
        self._label = label
        self._version = version
        self._runner = runner
        self._depth = metrics.queue_depth.labels(label, version)
        self._queue_seconds = metrics.queue_seconds.labels(label, version)
        self._queue: collections.deque[WorkItem] = collections.deque()  # withdrawn ones too
        self._waiting = 0  # queued and not withdrawn
        self._atoms = 0
        self._edges = 0
        self._room_callbacks: list[Callable[[], None]] = []
        self._closed = False
        self._last_batch = 1  # structures in the last batch: the batch-mates to expect
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()
        runner.attach(self)

    def submit(self, item: WorkItem, lone: bool = False) -> None:
        """Queue ``item``; QueueFullError when ``max_queue`` structures already wait,
        UnavailableError once closed. An idle device is asked to take the batch at once
        when it is ready (see the module docstring). ``lone``: the caller's call is the
        only one open (``inline.py``); if the device is idle and nothing else is queued,
        ``item`` is evaluated with the server's own copy of an eager model, in the
        calling thread before this returns when it is small enough
        (``inline.HERE_MAX_EDGES``), else in the runner's."""
        job = None
        with self._cond:
            if self._closed:
                raise UnavailableError("server is shutting down")
            if self._waiting >= self.limits.max_queue:
                raise QueueFullError(
                    f"model {self._label!r}: queue full ({self.limits.max_queue} structures "
                    "waiting); retry later"
                )
            first = self._head() is None
            item.enqueued = time.monotonic()
            item.queued = True
            self._queue.append(item)
            self._waiting += 1
            self._atoms += item.request.num_atoms
            self._edges += item.request.estimated_edges
            self._depth.set(self._waiting)
            if self._runner.idle and self._ready(item, item.enqueued):
                if lone and self._waiting == 1 and not self._runner.others_queued(self):
                    job = self._take_job(item.enqueued, idle_only=True)
                if job is None:
                    self._runner.poke()
                else:
                    job.evaluator = self._evaluator_alone
                    if item.request.estimated_edges > inline.HERE_MAX_EDGES:
                        self._runner.submit(job)  # too long to keep the I/O loop away
                        job = None
            elif first or self._budget_full() or not self._runner.idle:
                # a new deadline, a full budget or (the device busy) a graph to build ahead
                self._cond.notify_all()
        if job is not None:
            self._runner.run_here(job)

    @property
    def queued(self) -> int:
        """Structures waiting (``runner.Source``)."""
        return self._waiting

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the queue has room (at once if it has now, else from
        whichever thread takes a batch, possibly holding the batcher's lock); it must be
        quick and thread-safe and must not call the batcher."""
        with self._cond:
            if self._waiting >= self.limits.max_queue and not self._closed:
                self._room_callbacks.append(callback)
                return
        callback()

    def withdraw(self, item: WorkItem) -> None:
        """Nobody waits for ``item`` any more: out of the queue if it is still there (its
        future cancelled), else marked abandoned so that its batch may be skipped."""
        with self._cond:
            item.abandoned = True
            if not item.queued:
                return
            item.queued = False
            if not item.future.done() and item.future.cancel():
                # As an executor does: wakes ``concurrent.futures.wait`` (cancel() does not).
                item.future.set_running_or_notify_cancel()
            self._uncount(item)
            self._depth.set(self._waiting)
            callbacks = self._take_room_callbacks()
        for callback in callbacks:
            callback()

    def _uncount(self, item: WorkItem) -> None:
        self._waiting -= 1
        self._atoms -= item.request.num_atoms
        self._edges -= item.request.estimated_edges

    def _take_room_callbacks(self) -> list[Callable[[], None]]:
        """The callbacks to call now that there is room (under the lock)."""
        if self._waiting >= self.limits.max_queue or not self._room_callbacks:
            return []
        callbacks, self._room_callbacks = self._room_callbacks, []
        return callbacks

    def close(self) -> None:
        """Stop accepting, run everything still queued, and stop the thread."""
        with self._cond:
            self._closed = True
            callbacks, self._room_callbacks = self._room_callbacks, []
            self._cond.notify_all()
        for callback in callbacks:  # waiters learn that submitting now fails
            callback()
        self._thread.join()
        self._runner.detach(self)

    def offer(self) -> None:
        """The device is idle (``runner.Source``; the runner's thread): hand over the
        batch if it is ready, else let the batcher's thread time its delay."""
        with self._cond:
            job = self._take_job(time.monotonic(), idle_only=True)
            if (job is None and self._head() is not None) or self._closed:
                self._cond.notify_all()
        if job is not None:
            self._runner.submit(job)

    def _budget_full(self) -> bool:
        return self._atoms >= self.limits.max_atoms or self._edges >= self.limits.max_edges

    def _ready(self, head: WorkItem, now: float) -> bool:
        """Whether the queue should run now if the device is idle (under the lock)."""
        if self._closed or self._budget_full() or now - head.enqueued >= self.limits.max_delay:
            return True
        recent = now - self._runner.idle_since < self.limits.max_delay
        return self._waiting >= (self._last_batch if recent else 1)

    def _take_job(self, now: float, idle_only: bool) -> Job | None:
        """The next job if the queue is ready and the runner has a place for it (under the
        lock); the place is reserved. ``idle_only=False``: a full budget may also take the
        place behind a running job."""
        head = self._head()
        if head is None:
            return None
        if idle_only:
            if not self._ready(head, now) or not self._runner.reserve(self, idle_only=True):
                return None
        elif not self._budget_full() or not self._runner.reserve(self, idle_only=False):
            return None
        items = self._take()
        callbacks = self._take_room_callbacks()
        if callbacks:  # streams waiting for room; quick and thread-safe, so under the lock
            for callback in callbacks:
                callback()
        if items and all(item.abandoned for item in items):  # withdrawn as the batch formed
            for item in items:
                item.future.set_exception(RequestCancelledError("request cancelled"))
            items = []
        if not items:
            self._runner.release()
            return None
        self._last_batch = len(items)
        return Job(
            model=self._model,
            label=self._label,
            items=items,
            version=self._version,
            evaluator=self._evaluator,
        )

    def _loop(self) -> None:
        """Time the oldest structure's delay while the device is idle; while it is busy,
        build the graphs of the next batch's structures, and hand over a batch whose
        budget filled (the runner offers it the rest)."""
        while True:
            ahead: list[WorkItem] = []
            with self._cond:
                while True:
                    head = self._head()
                    if head is None:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    now = time.monotonic()
                    job = self._take_job(now, idle_only=False)
                    if job is not None:
                        break  # waits behind the running batch: build its graph now
                    if not self._runner.idle:
                        ahead = self._unbuilt()
                        if ahead:
                            break
                        self._cond.wait()  # the runner offers it the device when idle
                    elif self._ready(head, now):
                        self._runner.poke()
                        self._cond.wait()
                    else:
                        self._cond.wait(head.enqueued + self.limits.max_delay - now)
            if job is None:
                self._runner.graphs.build_ahead(self._model, ahead)
                continue
            self._runner.prepare(job)  # neighbour lists; a structure failing fails alone
            self._runner.submit(job)

    def _unbuilt(self) -> list[WorkItem]:
        """The structures of the next batch whose graphs nobody has built or is building,
        and that are proven cheap to build in-process (under the lock): what the batcher's
        thread builds while the device is busy, so that the batch does not wait for them
        once the device is idle. Costlier graphs wait for their batch (they go to workers
        that may take long, while the thread must stay free to hand over a full batch)."""
        unbuilt, atoms, edges = [], 0, 0
        cheap = self.limits.graphs.in_process_pairs
        for item in self._queue:
            if not item.queued:
                continue
            request = item.request
            atoms += request.num_atoms
            edges += request.estimated_edges
            if atoms > self.limits.max_atoms or edges > self.limits.max_edges:
                break
            if item.graph is None and not item.graph_lock.locked() and request.pairs_bound <= cheap:
                unbuilt.append(item)
        return unbuilt

    def _head(self) -> WorkItem | None:
        """The oldest item still queued (withdrawn entries in front are dropped)."""
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def _take(self) -> list[WorkItem]:
        """Pop the oldest live items that fit the budget (at least one); drop withdrawn,
        cancelled and expired ones on the way."""
        items: list[WorkItem] = []
        atoms = edges = 0
        now = time.monotonic()
        while (item := self._head()) is not None:
            request = item.request
            fits = (
                atoms + request.num_atoms <= self.limits.max_atoms
                and edges + request.estimated_edges <= self.limits.max_edges
            )
            if items and not fits:
                break
            self._queue.popleft()
            item.queued = False
            self._uncount(item)
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled by its caller while queued
            if item.deadline is not None and now >= item.deadline:
                item.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                continue
            item.taken = now
            self._queue_seconds.observe(now - item.enqueued)
            items.append(item)
            atoms += request.num_atoms
            edges += request.estimated_edges
        self._depth.set(self._waiting)
        return items
