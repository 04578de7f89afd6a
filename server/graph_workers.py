"""A pool of graph worker processes (``graph_worker.py``) with a time limit per structure.

A structure whose neighbour list kills its worker (a signal) or outlasts the time limit
is the poison: its worker is killed and replaced, and the structure is refused alone with
``PoisonError``. A worker found dead before it was given a structure (killed from outside)
is replaced and the structure tried again, since it was not the cause. A worker starts
when first needed (most servers never need one: small structures are built in-process) and
its start-up (imports, ~1 s) never counts against a structure's time limit; a killed
worker's replacement starts at once.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import subprocess
import sys
import time

import numpy as np

from crossfield.model import neighbours
from crossfield.model.neighbours import Frame, NeighbourListError

from .errors import PoisonError, UnavailableError
from .graph_worker import OK, READY

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds for a worker to import numpy and vesin on a busy machine
CHUNK = 1 << 20  # bytes per read from a worker
PIPE_CHUNK = 1 << 12  # bytes per write: a pipe that selects writable takes this many at once


class WorkerLostError(Exception):
    """The worker died or stalled while it had the structure."""


class WorkerBrokenError(Exception):
    """The worker was unusable before it had the structure (dead, or never started)."""


class GraphWorker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "crossfield.server.graph_worker", neighbours.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._ready = False

    def pairs(
        self, frame: Frame, r_max: float, timeout: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The neighbour list of ``frame`` (``neighbours.frame_pairs``) from this worker."""
        if not self._ready:
            try:
                self._ready = self._read(1, time.monotonic() + START_TIMEOUT) == READY
            except WorkerLostError as lost:
                raise WorkerBrokenError(f"graph worker did not start: {lost}") from None
        values = np.concatenate(
            [[r_max], frame.periodic, frame.box.ravel(), frame.positions.ravel()]
        ).astype("<f8")
        deadline = time.monotonic() + timeout
        self._write(np.array([values.size], "<i8").tobytes() + values.tobytes(), deadline)
        status, length = np.frombuffer(self._read(16, deadline), "<i8")
        if status != OK:
            raise NeighbourListError(self._read(int(length), deadline).decode())
        edges = np.frombuffer(self._read(40 * int(length), deadline), "<i8")
        sender, receiver, shifts = np.split(edges, [int(length), 2 * int(length)])
        return sender, receiver, shifts.reshape(-1, 3)

    def _write(self, data: bytes, deadline: float) -> None:
        """All of ``data`` to the worker; a worker that stops reading is lost like one that
        stops answering (a blocking write would wedge the batcher's thread)."""
        fd = self.process.stdin.fileno()
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                raise WorkerLostError("timeout")
            try:
                view = view[os.write(fd, view[:PIPE_CHUNK]) :]
            except OSError as err:  # EPIPE: it was dead before it had this structure
                raise WorkerBrokenError(f"graph worker gone: {err}") from None

    def _read(self, size: int, deadline: float) -> bytes:
        """Exactly ``size`` bytes of the reply, or WorkerLostError at EOF or the deadline."""
        fd = self.process.stdout.fileno()
        parts, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerLostError("timeout")
            part = os.read(fd, min(left, CHUNK))
            if not part:
                raise WorkerLostError(self._death())
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _death(self) -> str:
        code = self.process.wait()
        if code < 0:
            return f"it died of {signal.Signals(-code).name}"
        return f"it exited with code {code}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()

    def close(self, timeout: float = 5.0) -> None:
        """End the worker (it exits at the end of its input); kill it if it does not."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class GraphWorkers:
    """``count`` workers shared by every batcher of a runner."""

    def __init__(self, count: int, timeout: float) -> None:
        self.timeout = timeout
        self._idle: queue.Queue[GraphWorker | None] = queue.Queue()  # None: not started
        for _ in range(count):
            self._idle.put(None)

    def pairs(self, frame: Frame, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The neighbour list of ``frame`` from a worker (waits for a free one).

        Raises ``NeighbourListError`` for inputs the neighbour list refuses, ``PoisonError``
        when this structure killed or stalled the worker, ``UnavailableError`` when no
        worker can be started.
        """
        worker = self._idle.get() or GraphWorker()
        try:
            try:
                return worker.pairs(frame, r_max, self.timeout)
            except WorkerBrokenError as broken:  # not this structure's doing: try a new worker
                log.warning("replacing a graph worker: %s", broken)
                worker = _replace(worker)
                return worker.pairs(frame, r_max, self.timeout)
        except WorkerBrokenError as broken:
            worker = _replace(worker)
            raise UnavailableError(f"graph building unavailable: {broken}") from None
        except WorkerLostError as lost:
            worker = _replace(worker)
            reason = (
                f"graph building took longer than {self.timeout:g} s"
                if str(lost) == "timeout"
                else f"graph building crashed its worker process ({lost})"
            )
            log.warning("structure refused as poison: %s", reason)
            raise PoisonError(reason) from None
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        while not self._idle.empty():
            worker = self._idle.get()
            if worker is not None:
                worker.close()


def _replace(worker: GraphWorker) -> GraphWorker:
    worker.kill()
    return GraphWorker()
