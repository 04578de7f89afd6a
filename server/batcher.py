"""Decide which queued structures of one model run together.

A batch closes when its atom or edge budget is full, or when its oldest structure has
waited ``max_delay`` and the device is idle (while it is busy, waiting longer costs
nothing and makes the batch larger); structures with different heads share a batch (one
backbone pass).
The batcher knows budgets, not tensors: it builds the batch's graph (neighbour lists) in
its own thread, so that graph building overlaps with the previous batch computing on the
device, then hands the job to the device's runner.

Edges are only known after the neighbour list, so the edge budget is planned with each
structure's estimated edge count (see ``validation.estimate_neighbours``); a structure
larger than a whole budget runs alone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from crossfield.model import CrossfieldMACE

from .errors import DeadlineExceededError, QueueFullError, RequestCancelledError, UnavailableError
from .metrics import Metrics
from .runner import Job, Runner, build_graph
from .work import WorkItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    """Budgets of one batch and the bound of one model's queue."""

    max_atoms: int = 4096
    max_edges: int = 131072
    max_delay: float = 0.005  # seconds the oldest structure may wait for batch-mates
    max_queue: int = 4096  # structures waiting; beyond it RESOURCE_EXHAUSTED

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
    ) -> None:
        self.limits = limits
        self._model = model
        self._label = label
        self._runner = runner
        self._depth = metrics.queue_depth.labels(label)
        self._queue_seconds = metrics.queue_seconds.labels(label)
        self._queue: collections.deque[WorkItem] = collections.deque()
        self._atoms = 0
        self._edges = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()
        runner.add_listener(self._wake)

    def submit(
        self, item: WorkItem, wait: bool = False, give_up: Callable[[], bool] | None = None
    ) -> None:
        """Queue ``item``. A full queue raises QueueFullError, or with ``wait`` blocks until
        there is room (streams: back-pressure instead of errors) or ``give_up()`` is true."""
        with self._cond:
            while len(self._queue) >= self.limits.max_queue:
                if self._closed:
                    break
                if not wait:
                    raise QueueFullError(
                        f"model {self._label!r}: queue full ({self.limits.max_queue} structures "
                        "waiting); retry later"
                    )
                if give_up is not None and give_up():
                    raise RequestCancelledError(
                        "request cancelled while waiting for room in the queue"
                    )
                self._cond.wait(0.05)
            if self._closed:
                raise UnavailableError("server is shutting down")
            item.enqueued = time.monotonic()
            self._queue.append(item)
            self._atoms += item.request.num_atoms
            self._edges += item.request.estimated_edges
            self._depth.set(len(self._queue))
            self._cond.notify_all()

    def close(self) -> None:
        """Stop accepting, run everything still queued, and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
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
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                while not self._closed and not self._budget_full():
                    remaining = self._queue[0].enqueued + self.limits.max_delay - time.monotonic()
                    if remaining <= 0 and self._runner.idle:
                        break
                    # Past the delay but the device is busy: the structures would wait for
                    # it anyway, so keep collecting; the runner wakes us when it is idle.
                    self._cond.wait(remaining if remaining > 0 else None)
                items = self._take()
                self._cond.notify_all()  # streams waiting for room
            if items:
                self._dispatch(items)

    def _take(self) -> list[WorkItem]:
        """Pop the oldest live items that fit the budget (at least one); drop cancelled
        and expired ones on the way."""
        items: list[WorkItem] = []
        atoms = edges = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            request = item.request
            fits = (
                atoms + request.num_atoms <= self.limits.max_atoms
                and edges + request.estimated_edges <= self.limits.max_edges
            )
            if items and not fits:
                break
            self._queue.popleft()
            self._atoms -= request.num_atoms
            self._edges -= request.estimated_edges
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
        self._depth.set(len(self._queue))
        return items

    def _dispatch(self, items: list[WorkItem]) -> None:
        job = Job(model=self._model, label=self._label, items=items)
        try:
            job.graph = build_graph(self._model, items, self._runner.device)
        except Exception as err:  # the runner retries piecewise and isolates the culprit
            log.warning("graph of a %d-structure batch failed: %s", len(items), err)
        self._runner.submit(job)
