"""The asyncio ``compute_many``: one task per server, the design of ``stream.StreamRun``.

Structures move between the queue and the streams by the rules of ``work.Ledger`` under
one ``asyncio.Condition``; everything else (waiting for a server, poison control,
retryable answers, giving up) is as in the sync run, so read ``stream.py`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable

import grpc

from crossfield.client.connection import RetryPolicy
from crossfield.client.errors import (
    CrossfieldError,
    InvalidStructureError,
    ServerUnavailableError,
    from_rpc_error,
    lost_in_flight,
)
from crossfield.client.results import Result, response_result, retryable_answer
from crossfield.client.stream import STREAM_END_S
from crossfield.client.work import Ledger, OpenStream, Work
from crossfield.v1 import inference_pb2

# grpc.aio reports a bidirectional call that ended while the client was still writing as
# INTERNAL "Internal error from Core", losing the real status (seen when a server stops
# under a stream). For a stream that means it broke: it is handled as UNAVAILABLE, and
# the probe of the server then tells whether the server went away.
_BROKEN_WHILE_WRITING = ("INTERNAL", "Internal error from Core")

_END = object()  # the input has no more structures
_DONE = object()  # every structure is answered


class AsyncStreamRun:
    """Iterate with ``async for`` for the results, in the order they complete."""

    def __init__(
        self,
        servers,
        structures: Iterable | AsyncIterable,
        make_request: Callable[[int, object], inference_pb2.ComputeRequest],
        *,
        max_in_flight: int,
        retries: RetryPolicy,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {max_in_flight}")
        self._servers = servers  # an aio.AsyncRoundRobin
        self._source = structures
        self._make_request = make_request
        self._limit = max(1, math.ceil(max_in_flight / len(servers)))
        self._retries = retries
        self._metadata = metadata
        self._timeout = timeout
        self._cond = asyncio.Condition()
        self._ledger = Ledger(retries)
        self._results: asyncio.Queue = asyncio.Queue()
        self._index = 0
        self._source_error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[Result]:
        self._iterator = (
            aiter(self._source) if isinstance(self._source, AsyncIterable) else iter(self._source)
        )
        tasks = [asyncio.create_task(self._work_safely(c)) for c in self._servers.connections]
        completed = False
        try:
            given_up = 0
            while True:
                item = await self._results.get()
                if item is _DONE:
                    completed = True
                    break
                if isinstance(item, Result):
                    yield item
                    continue
                error, fatal = item
                given_up += 1
                if fatal or given_up == len(tasks):
                    raise error
            if self._source_error is not None:
                raise self._source_error
        finally:
            if completed:  # the streams end as completed calls (see ``StreamRun``)
                await asyncio.wait(tasks, timeout=STREAM_END_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _work_safely(self, connection) -> None:
        """A task that dies of a bug must still tell the reader, or the run would hang."""
        try:
            await self._work(connection)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            await self._results.put((CrossfieldError(repr(err), "CLIENT"), True))

    async def _work(self, connection) -> None:
        failures = 0  # stream failures since the last answer
        while True:
            if not await self._servers.wait_ready(connection, self._timeout):
                what = f"compute_many stream to {connection.address}"
                message = await self._servers.unreachable(what, self._timeout)
                await self._results.put((ServerUnavailableError(message, "UNAVAILABLE"), False))
                return
            stream = OpenStream(self._limit)
            call = connection.stub.ComputeStream(self._requests(stream), metadata=self._metadata)
            error = None
            try:
                async for response in call:
                    if await self._answer(stream, response):
                        failures = 0
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                if (error.code, error.details) == _BROKEN_WHILE_WRITING:
                    error = ServerUnavailableError(error.details, "UNAVAILABLE")
            lost = None
            if error is not None and await connection.went_away(error):
                lost = connection.address
            unanswered = await self._close(stream, lost)
            if error is None and not unanswered:
                return
            error = error or CrossfieldError("stream ended with requests unanswered", "UNKNOWN")
            if error.code not in self._retries.retry_on:
                await self._results.put((error, True))
                return
            failures += 1
            if failures >= self._retries.attempts:
                await self._results.put((error, False))
                return
            await asyncio.sleep(self._retries.delay(failures - 1))

    async def _requests(self, stream: OpenStream):
        while True:
            async with self._cond:
                taken = await self._take(stream)
            if taken is None:
                return
            if isinstance(taken, Work):
                yield taken.request
                continue
            index, atoms = taken
            try:
                request = self._make_request(index, atoms)
            except Exception as err:  # one unreadable input must not stop the run
                await self._finish(Result(index, error=InvalidStructureError(str(err), "CLIENT")))
                continue
            async with self._cond:
                placed = self._ledger.place(stream, Work(index, request))
                self._cond.notify_all()
            if placed:
                yield request

    async def _take(self, stream: OpenStream):
        """As ``StreamRun._take`` (under the condition's lock)."""
        ledger = self._ledger
        while True:
            if stream.closed:
                return None
            work, wait = ledger.next_for(stream, time.monotonic())
            if work is not None:
                ledger.place(stream, work)
                return work
            if stream.has_room() and not ledger.exhausted:
                atoms = await self._next_input()
                if atoms is _END:
                    await self._exhaust()
                    continue
                ledger.outstanding += 1
                self._index += 1
                return self._index - 1, atoms
            if ledger.done:
                return None
            with contextlib.suppress(asyncio.TimeoutError):  # a queued one is due
                await asyncio.wait_for(self._cond.wait(), wait)

    async def _next_input(self):
        """The next input structure, or ``_END`` (StopIteration must not cross a coroutine);
        an unreadable input ends the input and is raised once the rest is answered."""
        try:
            if isinstance(self._iterator, AsyncIterator):
                return await anext(self._iterator)
            return next(self._iterator)
        except (StopIteration, StopAsyncIteration):
            return _END
        except Exception as err:
            self._source_error = err
            return _END

    async def _exhaust(self) -> None:
        self._ledger.exhausted = True
        self._cond.notify_all()
        if self._ledger.outstanding == 0:
            await self._results.put(_DONE)

    async def _answer(self, stream: OpenStream, response: inference_pb2.ComputeResponse) -> bool:
        async with self._cond:
            work = self._ledger.answered(stream, response.id)
            retried = (
                work is not None
                and retryable_answer(response, self._retries)
                and self._ledger.retry_later(work, time.monotonic())
            )
            self._cond.notify_all()
        if retried:
            return True
        if work is None:
            return False
        await self._finish(response_result(response, work.index))
        return True

    async def _finish(self, result: Result) -> None:
        await self._results.put(result)
        async with self._cond:
            self._ledger.outstanding -= 1
            self._cond.notify_all()
            if self._ledger.done:
                await self._results.put(_DONE)

    async def _close(self, stream: OpenStream, lost: str | None) -> int:
        async with self._cond:
            unanswered = len(stream.pending)
            poisoned = self._ledger.close(stream, lost)
            self._cond.notify_all()
        for work in poisoned:
            await self._finish(Result(work.index, error=lost_in_flight(work.lost_on)))
        return unanswered
