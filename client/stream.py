"""Many structures over ``ComputeStream``: bounded in flight, spread over servers, retried.

One bidirectional stream per server address, each run by a worker thread. The streams
pull work from one shared input, so a faster server takes more; each keeps at most
``limit`` requests unanswered, which bounds the memory of both ends and keeps the
server's batcher fed without flooding its queue. Which structure is where, and what a
failure does to it, is the ``work.Ledger``'s business (one lock, one owner per
structure, poison control); this module runs the streams.

A stream that fails hands its unanswered requests back to the queue and reopens once its
server is up again (waiting up to the client's ``timeout`` for it); a stream that keeps
failing without an answer gives up after ``RetryPolicy.attempts``. The run ends when
every structure is answered, or with ``ServerUnavailableError`` when every stream gave
up first. Per-structure failures arrive as results with an error.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from crossfield.client.connection import Connection, RetryPolicy, RoundRobin
from crossfield.client.errors import (
    CrossfieldError,
    InvalidStructureError,
    ServerUnavailableError,
    from_rpc_error,
    lost_in_flight,
)
from crossfield.client.results import Result, response_result, retryable_answer
from crossfield.client.work import Ledger, OpenStream, Work
from crossfield.v1 import inference_pb2

MakeRequest = Callable[[int, object], inference_pb2.ComputeRequest]


@dataclass
class _WorkerEnd:
    error: CrossfieldError  # why a worker gave up
    fatal: bool = False  # a non-retryable failure of the whole stream: stop the run


_DONE = object()  # every structure is answered
STREAM_END_S = 5.0  # how long a finished run waits for its servers to end their streams


class StreamRun:
    """One ``compute_many``: iterate it for the results, in the order they complete."""

    def __init__(
        self,
        servers: RoundRobin,
        structures: Iterable,
        make_request: MakeRequest,
        *,
        max_in_flight: int,
        retries: RetryPolicy,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {max_in_flight}")
        self._servers = servers
        self._source = enumerate(structures)
        self._make_request = make_request
        self._limit = max(1, math.ceil(max_in_flight / len(servers)))
        self._retries = retries
        self._metadata = metadata
        self._timeout = timeout
        self._cond = threading.Condition()
        self._ledger = Ledger(retries)
        self._source_error: Exception | None = None  # raised once the rest is answered
        self._stopping = False
        self._calls: list[grpc.Future] = []
        self._results: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Result]:
        workers = [
            threading.Thread(target=self._work_safely, args=(c,), daemon=True)
            for c in self._servers.connections
        ]
        for worker in workers:
            worker.start()
        completed = False
        try:
            given_up = 0
            while True:
                item = self._results.get()
                if item is _DONE:
                    completed = True
                    break
                if isinstance(item, Result):
                    yield item
                    continue
                if item.fatal:
                    raise item.error
                given_up += 1
                if given_up == len(workers):
                    raise item.error
            if self._source_error is not None:
                raise self._source_error
        finally:
            # Every structure answered: the streams end as completed calls (no more
            # requests, then the server's OK), not cancelled ones. A cancel that crosses
            # the last answer on the wire makes the server count that answer CANCELLED,
            # though the client has it. Ended early (an error, or the caller stopped
            # iterating), they are cancelled at once.
            self._stop(cancel=not completed)
            for worker in workers:
                worker.join(timeout=STREAM_END_S)
            self._stop(cancel=True)  # a stream its server did not end in time

    # -- one worker per server -------------------------------------------------------------
    def _work_safely(self, connection: Connection) -> None:
        """A worker that dies of a bug must still tell the reader, or the run would hang."""
        try:
            self._work(connection)
        except Exception as err:
            self._results.put(_WorkerEnd(CrossfieldError(repr(err), "CLIENT"), fatal=True))

    def _work(self, connection: Connection) -> None:
        failures = 0  # stream failures since the last answer
        while not self._stopping:
            deadline = None if self._timeout is None else time.monotonic() + self._timeout
            if not self._servers.wait_ready(connection, deadline, lambda: self._stopping):
                if not self._stopping:
                    what = f"compute_many stream to {connection.address}"
                    message = self._servers.unreachable(what, self._timeout)
                    self._results.put(_WorkerEnd(ServerUnavailableError(message, "UNAVAILABLE")))
                return
            stream = OpenStream(self._limit)
            call = connection.stub.ComputeStream(self._requests(stream), metadata=self._metadata)
            with self._cond:
                if self._stopping:
                    call.cancel()
                    return
                self._calls.append(call)
            error = None
            try:
                for response in call:
                    if self._answer(stream, response):
                        failures = 0
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            with self._cond:
                self._calls.remove(call)
            lost = None
            if error is not None and connection.went_away(error):
                lost = connection.address
            unanswered = self._close(stream, lost)
            if self._stopping or (error is None and not unanswered):
                return
            error = error or CrossfieldError("stream ended with requests unanswered", "UNKNOWN")
            if error.code not in self._retries.retry_on:
                self._results.put(_WorkerEnd(error, fatal=True))
                return
            failures += 1
            if failures >= self._retries.attempts:
                self._results.put(_WorkerEnd(error))
                return
            time.sleep(self._retries.delay(failures - 1))

    def _requests(self, stream: OpenStream) -> Iterator[inference_pb2.ComputeRequest]:
        """The request iterator of one stream (gRPC consumes it on its own thread)."""
        while True:
            with self._cond:
                taken = self._take(stream)
            if taken is None:
                return
            if isinstance(taken, Work):
                yield taken.request
                continue
            index, atoms = taken
            try:
                request = self._make_request(index, atoms)
            except Exception as err:  # one unreadable input must not stop the run
                self._finish(Result(index, error=InvalidStructureError(str(err), "CLIENT")))
                continue
            with self._cond:
                placed = self._ledger.place(stream, Work(index, request))
                self._cond.notify_all()
            if placed:
                yield request

    def _take(self, stream: OpenStream) -> Work | tuple[int, object] | None:
        """Next for ``stream`` (under the lock): a queued structure (already placed in the
        stream), a fresh input (index, atoms) to turn into a request, or None to end."""
        ledger = self._ledger
        while True:
            if self._stopping or stream.closed:
                return None
            work, wait = ledger.next_for(stream, time.monotonic())
            if work is not None:
                ledger.place(stream, work)
                return work
            if stream.has_room() and not ledger.exhausted:
                try:
                    index, atoms = next(self._source)
                except StopIteration:
                    self._exhaust()
                    continue
                except Exception as err:  # unreadable input: finish what runs, then raise
                    self._source_error = err
                    self._exhaust()
                    continue
                ledger.outstanding += 1
                return index, atoms
            if ledger.done:
                return None
            self._cond.wait(wait)

    def _exhaust(self) -> None:
        self._ledger.exhausted = True
        self._cond.notify_all()
        if self._ledger.outstanding == 0:
            self._results.put(_DONE)

    def _answer(self, stream: OpenStream, response: inference_pb2.ComputeResponse) -> bool:
        """Deliver one response; a retryable answer of a live server goes back to the
        queue instead. True when the response answered a structure of this stream."""
        with self._cond:
            work = self._ledger.answered(stream, response.id)
            retried = (
                work is not None
                and retryable_answer(response, self._retries)
                and self._ledger.retry_later(work, time.monotonic())
            )
            self._cond.notify_all()  # room in the stream, or a structure back in the queue
        if retried:
            return True
        if work is None:
            return False
        self._finish(response_result(response, work.index))
        return True

    def _finish(self, result: Result) -> None:
        self._results.put(result)
        with self._cond:
            self._ledger.outstanding -= 1
            self._cond.notify_all()
            if self._ledger.done:
                self._results.put(_DONE)

    def _close(self, stream: OpenStream, lost: str | None) -> int:
        """A stream ended: its unanswered requests go back to the queue, but for those
        that now count as poison, which are answered with the error."""
        with self._cond:
            unanswered = len(stream.pending)
            poisoned = self._ledger.close(stream, lost)
            self._cond.notify_all()
        for work in poisoned:
            self._finish(Result(work.index, error=lost_in_flight(work.lost_on)))
        return unanswered

    def _stop(self, cancel: bool) -> None:
        """No more requests on any stream (each ends once its server has answered what it
        holds); ``cancel``: end the open calls now."""
        with self._cond:
            self._stopping = True
            calls = list(self._calls) if cancel else []
            self._cond.notify_all()
        for call in calls:
            call.cancel()


def in_order(results: Iterator[Result]) -> Iterator[Result]:
    """Results re-ordered by ``index`` (those that complete early wait in a buffer)."""
    waiting: dict[int, Result] = {}
    expected = 0
    for result in results:
        waiting[result.index] = result
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1
