"""One ComputeStream call: many structures over one stream, each answered exactly once, the
memory it holds bounded, and a client that stops talking cut off.

A stream runs as two coroutines on the I/O loop and costs no thread: a *reader* that takes
requests off the wire and queues them at their model, and the handler itself, which
*writes* answers as the batchers' futures complete (results cross back to the loop with
``call_soon_threadsafe``).

- **Window.** Structures read and not yet delivered hold an estimate of their bytes
  (request and response); while a stream's window (``window_bytes``) is full, its reader
  reads nothing more, so a client that sends faster than it reads is slowed down by
  HTTP/2 flow control instead of filling the server's memory. One structure larger than
  the window is admitted when the window is empty.
- **Full queue.** The reader waits for room at the batcher (``Batcher.when_room``) rather
  than failing the structure: streams are for throughput, and the wait is flow control.
- **Idle clock.** While the server waits for the client - for a request with nothing in
  progress, or for the client to take a response - for ``idle_timeout`` seconds, the
  stream ends UNAVAILABLE with a message saying so. UNAVAILABLE because reopening the
  stream is the remedy, and clients already retry it.
- **Stopping.** The reader stops, what is in progress is delivered, and the stream ends
  UNAVAILABLE if anything was left unanswered or unread, so the client resends that part
  to another replica.
- **Counting.** Every request read is counted once in ``crossfield_requests_total``: when
  its answer is written to the stream, with the answer's status; or, if the stream ends
  first, with the status the stream ended with (CANCELLED, DEADLINE_EXCEEDED,
  UNAVAILABLE), after its work is withdrawn from its batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from crossfield.v1 import inference_pb2

from .admission import Admission, Target, describe, record
from .errors import QueueFullError, RequestCancelledError, ServeError
from .metrics import Metrics
from .responses import MAX_STATUS_MESSAGE, encode_result, error_response
from .wire import Malformed
from .work import WorkItem

log = logging.getLogger(__name__)

# Status a structure is counted with when its stream ends before its answer was written.
END_STATUS = {
    "cancelled": "CANCELLED",
    "deadline": "DEADLINE_EXCEEDED",
    "idle": "UNAVAILABLE",
    "unread": "UNAVAILABLE",
    "stopping": "UNAVAILABLE",
}
MESSAGES = {
    "idle": "stream idle: nothing received for {timeout} while nothing was in progress "
    "(the server's --stream-idle-timeout); open a new stream when there is work",
    "unread": "stream not read: an answer waited {timeout} for the client to take it (the "
    "server's --stream-idle-timeout); unanswered requests may be resent",
    "stopping": "server stopping: the requests of this stream that were not answered can "
    "be sent to another replica",
}
RESPONSE_OVERHEAD = 256  # bytes of a response beyond its arrays and id
DEADLINE_SLACK = 0.05  # seconds left on the server's clock when a client's deadline fires


@dataclass(frozen=True)
class StreamLimits:
    """What one stream may hold and how long the server waits for its client."""

    idle_timeout: float = 120.0  # seconds; 0: wait forever
    window_bytes: int = 8 * 1024 * 1024  # estimated bytes read and not yet delivered

    def __post_init__(self) -> None:
        if self.idle_timeout < 0:
            raise ValueError(f"idle_timeout: must be >= 0 (0: none), got {self.idle_timeout}")
        if self.window_bytes < 1:
            raise ValueError(f"window_bytes: must be >= 1, got {self.window_bytes}")


@dataclass(eq=False)
class _Entry:
    """One request read from the stream, until it is counted."""

    request_id: str
    received: float
    cost: int
    target: Target = field(default_factory=Target)
    held: bool = False  # its cost is in the window
    item: WorkItem | None = None  # once queued at a batcher
    response: inference_pb2.ComputeResponse | None = None  # once answered
    status: str = "OK"


def _cost(request: inference_pb2.ComputeRequest | Malformed) -> int:
    """Estimated bytes a structure holds while in the stream: the request, and a response
    of about twice its size (float64 forces and atom energies for float32 positions)."""
    if isinstance(request, Malformed):
        return len(request.id) + MAX_STATUS_MESSAGE + RESPONSE_OVERHEAD
    return 3 * request.ByteSize() + RESPONSE_OVERHEAD


class StreamSession:
    """The state of one open ComputeStream (lives on the I/O loop only)."""

    def __init__(
        self,
        admission: Admission,
        metrics: Metrics,
        limits: StreamLimits,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._admission = admission
        self._metrics = metrics
        self._limits = limits
        self._context = context
        self._loop = asyncio.get_running_loop()
        self._deadline = call_deadline(context)
        self._entries: set[_Entry] = set()  # read and not yet counted
        self._ready: deque[_Entry] = deque()  # answered, not yet written
        self._held = 0  # bytes (estimated) of the entries
        self._outstanding = 0  # entries queued or computing
        self._reading = False  # the reader waits for the client's next request
        self._input_done = False  # the client closed its side
        self._reader_done = False
        self._stopping = False
        self._progress = self._loop.time()  # last request read or answer written
        self._wake = asyncio.Event()  # the writer has something to look at
        self._room = asyncio.Event()  # the window has room again

    def stop(self) -> None:
        """The server stops: read nothing more, deliver what is in progress, then end."""
        self._stopping = True
        self._wake.set()

    async def run(self, requests: AsyncIterator) -> None:
        """Serve the stream to its end; ends the call with a status unless it completed."""
        self._metrics.open_streams.inc()
        reader = asyncio.create_task(self._read(requests))
        reason = "cancelled"
        try:
            reason = await self._write_all(reader)
        except asyncio.CancelledError:
            reason = "deadline" if deadline_passed(self._context) else "cancelled"
            raise
        finally:
            reader.cancel()
            self._end(reason)
        if reason in MESSAGES:
            await abort_unavailable(self._context, MESSAGES[reason], self._limits)

    # -- writer ---------------------------------------------------------------------------
    async def _write_all(self, reader: asyncio.Task) -> str:
        """Write answers as they come; returns why the stream ends."""
        timeout = self._limits.idle_timeout
        while True:
            if self._ready:
                entry = self._ready.popleft()
                written = await write_response(self._context, entry.response, self._limits)
                if written == "cancelled":
                    self._ready.appendleft(entry)  # not delivered: counted at the end
                    return written
                # Handed to the transport: an answer whose write stalled still goes out if
                # the client reads later (gRPC cannot take it back), so it counts as sent.
                self._deliver(entry)
                if written == "unread":
                    return written
                continue
            if self._reader_done and not self._outstanding:
                if self._input_done:
                    return "completed"
                # Reading stopped early: the server is stopping, or the call broke under
                # the reader (the client went away) before gRPC cancelled this handler.
                return "stopping" if self._stopping else "cancelled"
            if self._stopping and not self._reader_done:
                reader.cancel()  # nothing more is read; what was read is answered
                self._reader_done = True
                continue
            self._wake.clear()
            idle_at = None
            if timeout and self._reading and not self._outstanding:
                idle_at = self._progress + timeout
                if idle_at <= self._loop.time():
                    return "idle"
            await wake_or_deadline(self._loop, self._wake, idle_at)

    def _deliver(self, entry: _Entry) -> None:
        self._entries.discard(entry)
        record(self._metrics, entry.target, entry.status, entry.received)
        self._release(entry)
        self._progress = self._loop.time()

    # -- reader ---------------------------------------------------------------------------
    async def _read(self, requests: AsyncIterator) -> None:
        iterator = requests.__aiter__()
        try:
            while True:
                self._reading = True
                if not self._outstanding and not self._ready:
                    self._wake.set()  # the idle clock may start now
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    self._input_done = True
                    return
                finally:
                    self._reading = False
                self._progress = self._loop.time()
                await self._accept(request)
        except asyncio.CancelledError:
            raise
        except Exception:  # the call is ending under the reader; the writer sees it end
            log.debug("reading a request stream ended", exc_info=True)
        finally:
            self._reader_done = True
            self._wake.set()

    async def _accept(self, request: inference_pb2.ComputeRequest | Malformed) -> None:
        """Admit one request (waiting for room in the window and the queue) or answer it
        with its error."""
        entry = _Entry(request.id, time.monotonic(), _cost(request))
        self._entries.add(entry)
        while self._held and self._held + entry.cost > self._limits.window_bytes:
            self._room.clear()
            await self._room.wait()
        self._held += entry.cost
        self._metrics.stream_held_bytes.inc(entry.cost)
        entry.held = True
        try:
            while True:
                try:
                    entry.item = self._admission.admit(request, self._deadline, entry.target)
                    break
                except QueueFullError:
                    await self._queue_room(entry.target)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # ServeError, or a bug: either way this request's answer
            if not isinstance(err, ServeError):
                log.exception("admitting a streamed request failed")
            error = describe(err)
            self._answer(entry, error_response(entry.request_id, error), error.code)
            return
        self._outstanding += 1
        entry.item.future.add_done_callback(lambda _, e=entry: self._notify(e))

    async def _queue_room(self, target: Target) -> None:
        room = self._loop.create_future()

        def resolve() -> None:
            if not room.done():
                room.set_result(None)

        target.served.batcher.when_room(lambda: self._loop.call_soon_threadsafe(resolve))
        await room

    # -- answers from the batchers' threads ----------------------------------------------
    def _notify(self, entry: _Entry) -> None:
        """Runs in whichever thread completed the future: hand the entry to the loop."""
        # A closed loop means the server stopped, and the stream was counted already.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._finished, entry)

    def _finished(self, entry: _Entry) -> None:
        if entry not in self._entries:
            return  # the stream ended first and counted it
        self._outstanding -= 1
        future = entry.item.future
        if future.cancelled():
            error: ServeError = RequestCancelledError("request cancelled")
        elif future.exception() is not None:
            error = describe(future.exception())
        else:
            served = entry.target.served
            response = encode_result(entry.request_id, served, entry.item, future.result())
            self._answer(entry, response, "OK")
            return
        self._answer(entry, error_response(entry.request_id, error), error.code)

    def _answer(self, entry: _Entry, response: inference_pb2.ComputeResponse, status: str):
        entry.response, entry.status = response, status
        self._ready.append(entry)
        self._wake.set()

    # -- the end --------------------------------------------------------------------------
    def _end(self, reason: str) -> None:
        """Withdraw what is still queued and count every entry not delivered."""
        status = END_STATUS.get(reason, "CANCELLED")
        for entry in self._entries:
            item = entry.item
            if item is not None and not item.future.done():
                entry.target.served.batcher.withdraw(item)
            record(self._metrics, entry.target, status, entry.received)
            self._release(entry)
        self._entries.clear()
        self._metrics.streams_ended.labels(reason).inc()
        self._metrics.open_streams.dec()

    def _release(self, entry: _Entry) -> None:
        if entry.held:
            entry.held = False
            self._held -= entry.cost
            self._metrics.stream_held_bytes.dec(entry.cost)
            self._room.set()


class OpenStreams:
    """The streams a service has open (on the I/O loop), so that a stopping server can
    tell each to deliver what it has in progress and end; one that opens after is told at
    once. A stream is anything with ``run(requests)`` and ``stop()``."""

    def __init__(self) -> None:
        self._streams: set = set()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        for stream in self._streams:
            stream.stop()

    async def serve(self, stream, requests) -> None:
        """Run ``stream`` on ``requests`` to its end, stoppable meanwhile."""
        self._streams.add(stream)
        if self._stopping:
            stream.stop()
        try:
            await stream.run(requests)
        finally:
            self._streams.discard(stream)


async def wake_or_deadline(
    loop: asyncio.AbstractEventLoop, wake: asyncio.Event, at: float | None
) -> None:
    """Wait until ``wake`` is set or the loop's clock reaches ``at`` (None: no limit); the
    caller then looks again at what it waits for (a stream's idle clock, its answers)."""
    timer = None if at is None else loop.call_later(max(0.0, at - loop.time()), wake.set)
    await wake.wait()
    if timer is not None:
        timer.cancel()


async def abort_unavailable(
    context: grpc.aio.ServicerContext, message: str, limits: StreamLimits
) -> None:
    """End a stream UNAVAILABLE with ``message`` (``{timeout}``: the idle timeout)."""
    timeout = f"{limits.idle_timeout:g} s"
    await context.abort(grpc.StatusCode.UNAVAILABLE, message.format(timeout=timeout))


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on ``time.monotonic()``'s clock; None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def write_response(
    context: grpc.aio.ServicerContext,
    response: inference_pb2.ComputeResponse,
    limits: StreamLimits,
) -> str:
    """Write one response of a stream (ComputeStream or a session): 'written', 'unread'
    (the client took nothing for ``limits.idle_timeout``) or 'cancelled' (the call is
    gone)."""
    try:
        if limits.idle_timeout:
            await asyncio.wait_for(context.write(response), limits.idle_timeout)
        else:
            await context.write(response)
    except asyncio.TimeoutError:
        return "unread"
    except asyncio.CancelledError:
        raise
    except Exception:  # the call ended under the write: the client went away
        return "cancelled"
    return "written"


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call's deadline has come: gRPC cancels a handler at its deadline as it
    does when the client cancels, and the two are counted apart.

    The client's timer starts before the server's (the timeout travels in a header and is
    rounded up on the wire), so a client that gives up at its deadline is seen here with a
    few milliseconds still left (5.5 ms measured on a loaded machine): that counts as the
    deadline too."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK
