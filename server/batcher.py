"""Decide which queued structures of one model run together.

A batch closes when its atom or edge budget is full, or when its oldest structure has
waited ``max_delay`` and the device is idle (while it is busy, waiting longer costs
nothing and makes the batch larger); structures with different heads share a batch (one
backbone pass).
The batcher knows budgets, not tensors: it builds the batch's graph (neighbour lists) in
its own thread, so that graph building overlaps with the previous batch computing on the
device, then hands the job to the device's runner.

Edges are only known after the neighbour list, so the edge budget is planned with each
structure's estimated edge count (see ``graph_cost.py``); a structure
larger than a whole budget runs alone.

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
from dataclasses import dataclass, field

from crossfield.model import CrossfieldMACE

from .errors import (
    DeadlineExceededError,
    QueueFullError,
    RequestCancelledError,
    UnavailableError,
)
from .graph_cost import GraphLimits
from .metrics import Metrics
from .runner import Job, Runner
from .work import WorkItem


@dataclass(frozen=True)
class BatchLimits:
    """Budgets of one batch, the bound of one model's queue, and the per-structure limits
    of graph building."""

    max_atoms: int = 4096
    max_edges: int = 131072
    max_delay: float = 0.005  # seconds the oldest structure may wait for batch-mates
    max_queue: int = 4096  # structures waiting; beyond it RESOURCE_EXHAUSTED
    graphs: GraphLimits = field(default_factory=GraphLimits)

    def __post_init__(self) -> None:
        for name in ("max_atoms", "max_edges", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_delay < 0:
            raise ValueError(f"max_delay: must be >= 0, got {self.max_delay}")


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
    ) -> None:
        self.limits = limits
        self._model = model
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
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()
        runner.add_listener(self._wake)

    def submit(self, item: WorkItem) -> None:
        """Queue ``item``; QueueFullError when ``max_queue`` structures already wait,
        UnavailableError once closed."""
        with self._cond:
            if self._closed:
                raise UnavailableError("server is shutting down")
            if self._waiting >= self.limits.max_queue:
                raise QueueFullError(
                    f"model {self._label!r}: queue full ({self.limits.max_queue} structures "
                    "waiting); retry later"
                )
            item.enqueued = time.monotonic()
            item.queued = True
            self._queue.append(item)
            self._waiting += 1
            self._atoms += item.request.num_atoms
            self._edges += item.request.estimated_edges
            self._depth.set(self._waiting)
            self._cond.notify_all()

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the queue has room (at once if it has now, else from
        the batcher's thread); it must be quick and thread-safe."""
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
            item.future.cancel()
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
        self._runner.remove_listener(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _budget_full(self) -> bool:
        return self._atoms >= self.limits.max_atoms or self._edges >= self.limits.max_edges

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._head() and not self._closed:
                    self._cond.wait()
                if not self._head():
                    return
                while not self._closed and not self._budget_full():
                    head = self._head()
                    if head is None:
                        break  # everything queued was withdrawn meanwhile
                    remaining = head.enqueued + self.limits.max_delay - time.monotonic()
                    if remaining <= 0 and self._runner.idle:
                        break
                    # Past the delay but the device is busy: the structures would wait for
                    # it anyway, so keep collecting; the runner wakes us when it is idle.
                    self._cond.wait(remaining if remaining > 0 else None)
                items = self._take()
                callbacks = self._take_room_callbacks()
            for callback in callbacks:  # streams waiting for room
                callback()
            if items:
                self._dispatch(items)

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

    def _dispatch(self, items: list[WorkItem]) -> None:
        if all(item.abandoned for item in items):  # withdrawn while the batch formed
            for item in items:
                item.future.set_exception(RequestCancelledError("request cancelled"))
            return
        job = Job(model=self._model, label=self._label, items=items, version=self._version)
        self._runner.prepare(job)  # neighbour lists; a structure that fails there fails alone
        self._runner.submit(job)
