"""``AsyncClient``: the asyncio flavour of ``Client``, on ``grpc.aio``.

For programs that already run an event loop (workflow engines, web services, active
learning drivers juggling many simulations): the calls are awaitable and
``compute_many`` is an async iterator, with the same semantics as the sync ``Client``:
calls go to a server that is up (waiting for one within the deadline), are retried with
backoff round-robin over the servers, a structure in flight when servers went away is
not replayed on every other, one stream per server keeps a bounded number in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc
from tqdm.auto import tqdm

from crossfield.client.aio_stream import AsyncStreamRun
from crossfield.client.client import DEFAULT_PROPERTIES, _retry_policy, _retryable
from crossfield.client.connection import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEALTH_CHECK,
    PROBE_TIMEOUT_S,
    READY,
    RetryPolicy,
    Security,
    as_bytes,
    open_channel,
    probe_failed,
)
from crossfield.client.errors import (
    CrossfieldError,
    DeadlineExceededError,
    ServerUnavailableError,
    from_rpc_error,
    lost_in_flight,
    never_sent,
)
from crossfield.client.results import Result, atoms_request, check_properties, response_result
from crossfield.v1 import inference_pb2, inference_pb2_grpc

_UNSETTLED = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


class AsyncConnection:
    """One server address on ``grpc.aio``: channel, stub and the probes of ``Connection``."""

    def __init__(
        self, address: str, security: Security, max_message_bytes: int, retries: RetryPolicy
    ) -> None:
        self.address = address
        self.channel = open_channel(address, security, max_message_bytes, retries, aio=True)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self._probe = self.channel.unary_unary(
            HEALTH_CHECK, request_serializer=as_bytes, response_deserializer=as_bytes
        )

    def state(self) -> grpc.ChannelConnectivity:
        """The channel's state; an idle channel is asked to connect."""
        return self.channel.get_state(try_to_connect=True)

    async def answers(self) -> bool:
        """See ``Connection.answers``."""
        try:
            await self._probe(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            return not probe_failed(err)
        return True

    async def went_away(self, error: CrossfieldError) -> bool:
        """See ``Connection.went_away``."""
        if error.code != "UNAVAILABLE":
            return False
        return not await self.answers() and not never_sent(error)

    async def why_unreachable(self) -> str:
        try:
            await self._probe(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            return f"{self.address}: {err.details()}"
        return f"{self.address}: reachable now"


class AsyncRoundRobin:
    """``connection.RoundRobin`` for ``AsyncConnection``s (one event loop: no lock)."""

    def __init__(
        self,
        addresses: Sequence[str],
        security: Security,
        max_message_bytes: int,
        retries: RetryPolicy,
    ) -> None:
        self.connections = [
            AsyncConnection(a, security, max_message_bytes, retries) for a in addresses
        ]
        self._cycle = itertools.cycle(self.connections)

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def waits_for_ready(self) -> bool:
        """See ``RoundRobin.waits_for_ready``: with several addresses a call fails at once
        on a server that went away between ``pick`` and the call, and moves on."""
        return len(self.connections) == 1

    async def pick(
        self, deadline: float | None, after: AsyncConnection | None = None
    ) -> AsyncConnection | None:
        """See ``RoundRobin.pick``."""
        if after is None:
            first = next(self._cycle)
        else:
            first = self.connections[(self.connections.index(after) + 1) % len(self)]
        start = self.connections.index(first)
        order = self.connections[start:] + self.connections[:start]
        for connection in order:
            state = connection.state()
            while state in _UNSETTLED:
                changed = connection.channel.wait_for_state_change(state)
                if not await _within(changed, deadline):
                    return None
                state = connection.state()
            if state == READY:
                return connection
        waits = {asyncio.ensure_future(c.channel.channel_ready()): c for c in order}
        try:
            done, _ = await asyncio.wait(
                waits, timeout=_remaining(deadline), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        return next((waits[w] for w in done if not w.cancelled()), None)

    async def wait_ready(self, connection: AsyncConnection, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for ``connection``'s server to be up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return await _within(connection.channel.channel_ready(), deadline)

    async def unreachable(self, what: str, timeout: float | None) -> str:
        reasons = [await c.why_unreachable() for c in self.connections]
        return f"{what}: no server reachable within {timeout} s ({'; '.join(reasons)})"

    async def no_server(self, what: str, timeout: float | None) -> CrossfieldError:
        """See ``RoundRobin.no_server``."""
        failed = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
        if any(c.channel.get_state() not in failed for c in self.connections):
            return DeadlineExceededError(
                f"{what}: no answer within {timeout} s", "DEADLINE_EXCEEDED"
            )
        return ServerUnavailableError(await self.unreachable(what, timeout), "UNAVAILABLE")

    async def close(self) -> None:
        for connection in self.connections:
            await connection.channel.close()


async def _within(awaitable, deadline: float | None) -> bool:
    """Await ``awaitable``; False (and it cancelled) if the deadline passes first."""
    try:
        await asyncio.wait_for(awaitable, _remaining(deadline))
    except asyncio.TimeoutError:
        return False
    return True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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
        self._servers: AsyncRoundRobin | None = None

    def _pool(self) -> AsyncRoundRobin:
        if self._servers is None:
            self._servers = AsyncRoundRobin(
                self._addresses, self.security, self._max_message_bytes, self.retries
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
        return response_result(await self._unary("Compute", request, timeout, poison=True))

    async def list_models(self, timeout: float | None = None) -> inference_pb2.ListModelsResponse:
        return await self._unary("ListModels", inference_pb2.ListModelsRequest(), timeout)

    async def get_model(
        self, name: str = "", version: str = "", timeout: float | None = None
    ) -> inference_pb2.ModelInfo:
        request = inference_pb2.GetModelRequest(name=name, version=version)
        return await self._unary("GetModel", request, timeout)

    async def _unary(self, method: str, request, timeout: float | None, poison: bool = False):
        """See ``Client._unary``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        servers = self._pool()
        lost: list[str] = []
        failures = 0
        connection = None
        while True:
            connection = await servers.pick(deadline, after=connection)
            if connection is None:
                raise await servers.no_server(method, timeout)
            try:
                call = getattr(connection.stub, method)
                return await call(
                    request,
                    timeout=_remaining(deadline),
                    metadata=self._metadata,
                    wait_for_ready=servers.waits_for_ready,
                )
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            if poison and await connection.went_away(error):
                lost.append(connection.address)
                limit = self.retries.poison_after
                if limit is not None and len(lost) >= limit:
                    raise lost_in_flight(lost, method) from None
            failures += 1
            if not _retryable(error, self.retries, len(servers)) or (
                failures >= self.retries.attempts
            ):
                raise error from None
            delay = self.retries.delay(failures - 1)
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
        if total is None and hasattr(structures, "__len__"):
            total = len(structures)

        def make_request(index: int, atoms) -> inference_pb2.ComputeRequest:
            return self._request(atoms, wanted, model, version, head, id=str(index))

        run = AsyncStreamRun(
            self._pool(),
            structures,
            make_request,
            max_in_flight=max_in_flight,
            retries=self.retries,
            metadata=self._metadata,
            timeout=self.timeout,
        )
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
            await self._servers.close()
            self._servers = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
