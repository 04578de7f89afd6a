"""Many structures over ``ComputeStream``: bounded in flight, spread over servers, retried.

One bidirectional stream per server address, each run by a worker thread. The streams
pull work from one shared input, so a faster server takes more; each keeps at most
``limit`` requests unanswered, which bounds the memory of both ends and keeps the
server's batcher fed without flooding its queue. A stream that fails with a retryable
status (UNAVAILABLE: a server restarting) hands its unanswered requests back to the
shared input, waits with backoff and reopens; when no stream is left the run ends with
``ServerUnavailableError``. Per-structure failures arrive as results with an error.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from crossfield.client.connection import Connection, RetryPolicy
from crossfield.client.errors import CrossfieldError, InvalidStructureError, from_rpc_error
from crossfield.client.results import Result, response_result
from crossfield.v1 import inference_pb2

MakeRequest = Callable[[int, object], inference_pb2.ComputeRequest]


@dataclass
class OpenStream:
    """The requests one open stream has sent and not yet had answered (sync and aio)."""

    limit: int
    pending: dict[str, tuple[int, inference_pb2.ComputeRequest]] = field(default_factory=dict)
    closed: bool = False


@dataclass
class _WorkerEnd:
    error: CrossfieldError | None = None  # the last error of a worker that gave up
    fatal: bool = False  # a non-retryable failure of the whole stream: stop the run


class StreamRun:
    """One ``compute_many``: iterate it for the results, in the order they complete."""

    def __init__(
        self,
        connections: list[Connection],
        structures: Iterable,
        make_request: MakeRequest,
        *,
        max_in_flight: int,
        retries: RetryPolicy,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {max_in_flight}")
        self._connections = connections
        self._source = enumerate(structures)
        self._make_request = make_request
        self._limit = max(1, math.ceil(max_in_flight / len(connections)))
        self._retries = retries
        self._metadata = metadata
        self._cond = threading.Condition()
        self._exhausted = False
        self._retry: deque[tuple[int, inference_pb2.ComputeRequest]] = deque()
        self._outstanding = 0  # taken from the input and not yet answered
        self._source_error: Exception | None = None  # raised once the rest is answered
        self._stopping = False
        self._calls: list[grpc.Future] = []
        self._results: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Result]:
        workers = [
            threading.Thread(target=self._work_safely, args=(c,), daemon=True)
            for c in self._connections
        ]
        for worker in workers:
            worker.start()
        try:
            ended, last_error = 0, None
            while ended < len(workers):
                item = self._results.get()
                if isinstance(item, Result):
                    yield item
                    continue
                ended += 1
                last_error = item.error or last_error
                if item.fatal:
                    raise item.error
            with self._cond:
                unfinished = self._outstanding > 0 or not self._exhausted
            if unfinished:
                raise last_error or CrossfieldError("every stream ended before all results came")
            if self._source_error is not None:
                raise self._source_error
        finally:
            self._stop()
            for worker in workers:
                worker.join(timeout=5.0)

    # -- one worker per server -------------------------------------------------------------
    def _work_safely(self, connection: Connection) -> None:
        """A worker that dies of a bug must still tell the reader, or the run would hang."""
        try:
            self._work(connection)
        except Exception as err:
            self._results.put(_WorkerEnd(CrossfieldError(repr(err), "CLIENT"), fatal=True))

    def _work(self, connection: Connection) -> None:
        delays = None
        while True:
            stream = OpenStream(self._limit)
            call = connection.stub.ComputeStream(self._requests(stream), metadata=self._metadata)
            with self._cond:
                if self._stopping:
                    call.cancel()
                    return
                self._calls.append(call)
            try:
                for response in call:
                    self._answer(stream, response)
                    delays = None  # progress resets the backoff
                error = None
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            unanswered = self._close(stream)
            if self._stopping or (error is None and not unanswered):
                self._results.put(_WorkerEnd())
                return
            if error is None:
                error = CrossfieldError("stream ended with requests unanswered", "UNKNOWN")
            elif error.code not in self._retries.retry_on:
                self._results.put(_WorkerEnd(error, fatal=True))
                return
            delays = delays or self._retries.delays()
            delay = next(delays, None)
            if delay is None:
                self._results.put(_WorkerEnd(error))
                return
            time.sleep(delay)

    def _requests(self, stream: OpenStream) -> Iterator[inference_pb2.ComputeRequest]:
        """The request iterator of one stream (gRPC consumes it on its own thread)."""
        while True:
            with self._cond:
                taken = self._take(stream)
                if taken is None:
                    return
                index, payload, fresh = taken
            if fresh:
                try:
                    request = self._make_request(index, payload)
                except Exception as err:  # one unreadable input must not stop the run
                    self._finish(Result(index, error=InvalidStructureError(str(err), "CLIENT")))
                    continue
            else:
                request = payload
            with self._cond:
                stream.pending[request.id] = (index, request)
            yield request

    def _take(self, stream: OpenStream) -> tuple[int, object, bool] | None:
        """Next work for ``stream`` (under the lock): a retry, a new input, or None to end."""
        while True:
            if self._stopping or stream.closed:
                return None
            if len(stream.pending) < stream.limit:
                if self._retry:
                    index, request = self._retry.popleft()
                    return index, request, False
                if not self._exhausted:
                    try:
                        index, atoms = next(self._source)
                    except StopIteration:
                        self._exhausted = True
                        self._cond.notify_all()
                        continue
                    except Exception as err:  # unreadable input: finish what runs, then raise
                        self._source_error = err
                        self._exhausted = True
                        self._cond.notify_all()
                        continue
                    self._outstanding += 1
                    return index, atoms, True
            if self._exhausted and not self._retry and self._outstanding == 0:
                return None
            self._cond.wait()

    def _answer(self, stream: OpenStream, response: inference_pb2.ComputeResponse) -> None:
        with self._cond:
            entry = stream.pending.pop(response.id, None)
            self._cond.notify_all()
        if entry is not None:
            self._finish(response_result(response, entry[0]))

    def _finish(self, result: Result) -> None:
        self._results.put(result)
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()

    def _close(self, stream: OpenStream) -> int:
        """A stream ended: its unanswered requests go back to the shared input."""
        with self._cond:
            stream.closed = True
            unanswered = len(stream.pending)
            self._retry.extend(stream.pending.values())
            stream.pending.clear()
            self._cond.notify_all()
        return unanswered

    def _stop(self) -> None:
        with self._cond:
            self._stopping = True
            calls = list(self._calls)
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
