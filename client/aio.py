"""``AsyncClient``: the asyncio flavour of ``Client``, on ``grpc.aio``.

For programs that already run an event loop (workflow engines, web services, active
learning drivers juggling many simulations): the calls are awaitable and
``compute_many`` is an async iterator, with the same semantics as the sync ``Client``:
unary calls retried with backoff round-robin over the servers, one stream per server
with a bounded number in flight, unanswered requests of a failed stream re-sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc
from tqdm.auto import tqdm

from crossfield.client.client import DEFAULT_PROPERTIES, _retry_policy
from crossfield.client.connection import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Connection,
    RoundRobin,
    Security,
)
from crossfield.client.errors import (
    CrossfieldError,
    DeadlineExceededError,
    InvalidStructureError,
    from_rpc_error,
)
from crossfield.client.results import Result, atoms_request, check_properties, response_result
from crossfield.client.stream import OpenStream
from crossfield.v1 import inference_pb2


class AsyncClient:
    """Like ``Client`` (same arguments), with awaitable calls.

    Channels are opened on first use, inside the running event loop; close with
    ``await client.close()`` or ``async with AsyncClient(...) as client``.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        model: str = "",
        version: str | None = None,
        head: str | None = None,
        timeout: float | None = 60.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        retries=None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._addresses = [address] if isinstance(address, str) else list(address)
        if not self._addresses:
            raise ValueError("address: need at least one server address")
        self.security = Security(
            tls, root_certificates, token, server_name, client_certificate, client_key
        )
        self.retries = _retry_policy(retries)
        self.model = model or ""
        self.version = version or ""
        self.head = head or ""
        self.timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._metadata = self.security.metadata()
        self._servers: RoundRobin | None = None

    def _pool(self) -> RoundRobin:
        if self._servers is None:
            self._servers = RoundRobin(
                [
                    Connection(a, self.security, self._max_message_bytes, aio=True)
                    for a in self._addresses
                ]
            )
        return self._servers

    async def compute(
        self,
        atoms,
        properties: Sequence[str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        version: str | None = None,
        head: str | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Evaluate one structure; raises a ``CrossfieldError`` subclass on failure."""
        request = self._request(atoms, check_properties(properties), model, version, head)
        return response_result(await self._unary("Compute", request, timeout))

    async def list_models(self, timeout: float | None = None) -> inference_pb2.ListModelsResponse:
        return await self._unary("ListModels", inference_pb2.ListModelsRequest(), timeout)

    async def get_model(
        self, name: str = "", version: str = "", timeout: float | None = None
    ) -> inference_pb2.ModelInfo:
        request = inference_pb2.GetModelRequest(name=name, version=version)
        return await self._unary("GetModel", request, timeout)

    async def _unary(self, method: str, request, timeout: float | None):
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.retries.delays()
        connection = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError(
                    f"{method}: no answer within {timeout} s", "DEADLINE_EXCEEDED"
                )
            servers = self._pool()
            connection = servers.next() if connection is None else servers.after(connection)
            try:
                call = getattr(connection.stub, method)
                return await call(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
                delay = next(delays, None) if error.code in self.retries.retry_on else None
                if delay is None:
                    raise error from None
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(delay)

    async def compute_many(
        self,
        structures: Iterable | AsyncIterable,
        properties: Sequence[str] = DEFAULT_PROPERTIES,
        *,
        model: str | None = None,
        version: str | None = None,
        head: str | None = None,
        max_in_flight: int = 256,
        ordered: bool = True,
        progress: bool = False,
        total: int | None = None,
    ) -> AsyncIterator[Result]:
        """Async iterator of ``Result``; see ``Client.compute_many``."""
        wanted = check_properties(properties)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {max_in_flight}")
        if total is None and hasattr(structures, "__len__"):
            total = len(structures)
        run = _AsyncStreamRun(self, structures, wanted, model, version, head, max_in_flight)
        waiting: dict[int, Result] = {}
        expected = 0
        with tqdm(total=total, disable=not progress, unit="structure", dynamic_ncols=True) as bar:
            async for result in run:
                bar.update(1)
                if not ordered:
                    yield result
                    continue
                waiting[result.index] = result
                while expected in waiting:
                    yield waiting.pop(expected)
                    expected += 1

    def _request(self, atoms, properties, model, version, head, id: str = ""):
        return atoms_request(
            atoms,
            properties,
            model=self.model if model is None else model,
            version=self.version if version is None else version,
            head=self.head if head is None else head,
            id=id,
        )

    async def close(self) -> None:
        if self._servers is not None:
            for connection in self._servers.connections:
                await connection.channel.close()
            self._servers = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


_END = object()


class _AsyncStreamRun:
    """One async ``compute_many``: a task per server, the design of ``stream.StreamRun``."""

    def __init__(
        self, client: AsyncClient, structures, properties, model, version, head, max_in_flight
    ):
        self._client = client
        self._source = structures
        self._make = lambda index, atoms: client._request(
            atoms, properties, model, version, head, id=str(index)
        )
        connections = client._pool().connections
        self._connections = connections
        self._limit = max(1, math.ceil(max_in_flight / len(connections)))
        self._cond = asyncio.Condition()
        self._exhausted = False
        self._retry: deque = deque()
        self._outstanding = 0
        self._results: asyncio.Queue = asyncio.Queue()
        self._index = 0
        self.source_error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[Result]:
        self._iterator = (
            aiter(self._source) if isinstance(self._source, AsyncIterable) else iter(self._source)
        )
        tasks = [asyncio.create_task(self._work(c)) for c in self._connections]
        try:
            ended, last_error = 0, None
            while ended < len(tasks):
                item = await self._results.get()
                if isinstance(item, Result):
                    yield item
                    continue
                ended += 1
                error, fatal = item
                last_error = error or last_error
                if fatal:
                    raise error
            if self._outstanding > 0 or not self._exhausted:
                raise last_error or CrossfieldError("every stream ended before all results came")
            if self.source_error is not None:
                raise self.source_error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _next_input(self):
        """The next input structure, or ``_END`` (StopIteration must not cross a coroutine)."""
        try:
            if isinstance(self._iterator, AsyncIterator):
                return await anext(self._iterator)
            return next(self._iterator)
        except (StopIteration, StopAsyncIteration):
            return _END

    async def _work(self, connection: Connection) -> None:
        retries = self._client.retries
        delays = None
        while True:
            stream = OpenStream(self._limit)
            requests = self._requests(stream)
            call = connection.stub.ComputeStream(requests, metadata=self._client._metadata)
            error = None
            try:
                async for response in call:
                    async with self._cond:
                        entry = stream.pending.pop(response.id, None)
                        self._cond.notify_all()
                    if entry is not None:
                        await self._finish(response_result(response, entry[0]))
                    delays = None
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            except Exception as err:  # a bug must reach the reader, not hang the run
                error = CrossfieldError(repr(err), "CLIENT")
                await self._results.put((error, True))
                return
            async with self._cond:
                stream.closed = True
                unanswered = len(stream.pending)
                self._retry.extend(stream.pending.values())
                stream.pending.clear()
                self._cond.notify_all()
            if error is None and not unanswered:
                await self._results.put((None, False))
                return
            if error is not None and error.code not in retries.retry_on:
                await self._results.put((error, True))
                return
            delays = delays or retries.delays()
            delay = next(delays, None)
            if delay is None:
                await self._results.put((error, False))
                return
            await asyncio.sleep(delay)

    async def _requests(self, stream: OpenStream):
        while True:
            async with self._cond:
                taken = await self._take(stream)
            if taken is None:
                return
            index, payload, fresh = taken
            if fresh:
                try:
                    request = self._make(index, payload)
                except Exception as err:  # one unreadable input must not stop the run
                    error = InvalidStructureError(str(err), "CLIENT")
                    await self._finish(Result(index, error=error))
                    continue
            else:
                request = payload
            async with self._cond:
                stream.pending[request.id] = (index, request)
            yield request

    async def _take(self, stream: OpenStream):
        while True:
            if stream.closed:
                return None
            if len(stream.pending) < stream.limit:
                if self._retry:
                    index, request = self._retry.popleft()
                    return index, request, False
                if not self._exhausted:
                    try:
                        atoms = await self._next_input()
                    except Exception as err:  # unreadable input: finish what runs, then raise
                        self.source_error, atoms = err, _END
                    if atoms is _END:
                        self._exhausted = True
                        self._cond.notify_all()
                        continue
                    self._outstanding += 1
                    self._index += 1
                    return self._index - 1, atoms, True
            if self._exhausted and not self._retry and self._outstanding == 0:
                return None
            await self._cond.wait()

    async def _finish(self, result: Result) -> None:
        await self._results.put(result)
        async with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()
