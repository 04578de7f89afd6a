"""Who may call what: TLS credentials, bearer tokens and a per-client concurrency limit.

Every RPC passes one server interceptor before any request bytes are parsed:

- ``grpc.health.v1.Health`` is open, so that load balancers and Kubernetes probes (which
  cannot send tokens) can see whether a replica is ready; it reveals nothing else.
- ``crossfield.v1.Admin`` needs the admin token. Without an admin token configured, admin
  calls are refused: changing what a server serves is never open by default.
- Everything else (inference, reflection) needs the client token when one is configured;
  the admin token is accepted there too. No client token: inference is open.

A missing or unknown token is UNAUTHENTICATED; a valid client token on an admin call is
PERMISSION_DENIED. Tokens are compared with ``hmac.compare_digest`` (no timing oracle) and
never logged: ``SecurityConfig`` keeps them out of its ``repr``.

The concurrency limit counts the calls in flight per client; beyond it a call is answered
RESOURCE_EXHAUSTED at once, so one greedy client cannot take a replica's capacity. A client
is its token where it authenticated with one (each of several client tokens is a client of
its own, wherever it connects from; all holders of one token share its limit), else its
peer address without the port (one machine, however many channels it opens). Keying on
tokens is what lets honest clients behind one NAT or proxy each have their own limit.

The server runs on ``grpc.aio``: the interceptor and the limit live on the I/O loop, so the
limiter needs no lock.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health

from .metrics import Metrics

ADMIN_SERVICE = "crossfield.v1.Admin"
OPEN_SERVICES = frozenset({health.SERVICE_NAME})


@dataclass
class SecurityConfig:
    """TLS files (PEM), bearer tokens and the per-client limit of ``crossfield serve``.

    ``tls_client_ca`` switches on mutual TLS: clients must present a certificate signed by
    it. ``more_tokens`` are further client tokens (one per client or tenant, each with its
    own per-client limit). ``max_calls_per_client`` 0 means no limit.
    """

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    max_calls_per_client: int = 0
    more_tokens: tuple[str, ...] = field(default=(), repr=False)

    @property
    def client_tokens(self) -> tuple[str, ...]:
        return ((self.token,) if self.token is not None else ()) + tuple(self.more_tokens)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (the certificate and its key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key as well")
        for name in ("token", "admin_token"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name}: must not be empty")
        if self.more_tokens and self.token is None:
            raise ValueError("more_tokens: give the first client token as token")
        for index, value in enumerate(self.more_tokens):
            if not value.strip() or value != value.strip() or " " in value:
                raise ValueError(
                    f"more_tokens: token {index + 1} is empty or contains spaces (not sendable "
                    "as 'Bearer <token>')"
                )
        if self.admin_token is not None and self.admin_token in self.client_tokens:
            raise ValueError("admin_token: must differ from the client tokens")
        if len(set(self.client_tokens)) != len(self.client_tokens):
            raise ValueError("more_tokens: every client token must be different")
        if self.max_calls_per_client < 0:
            raise ValueError(
                f"max_calls_per_client: must be >= 0 (0: no limit), got {self.max_calls_per_client}"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials from the PEM files; mutual TLS when a client CA is given."""
        pair = (_read(self.tls_key, "tls_key"), _read(self.tls_cert, "tls_cert"))
        client_ca = _read(self.tls_client_ca, "tls_client_ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def describe(self) -> str:
        """One log line of what is switched on, without any secret."""
        tls = "mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"
        count = len(self.client_tokens)
        token = (
            f"{count} client token{'s' if count > 1 else ''}"
            if count
            else "no client token (inference open)"
        )
        admin = "admin token" if self.admin_token else "admin RPCs disabled (no admin token)"
        limit = self.max_calls_per_client or "unlimited"
        return f"{tls}, {token}, {admin}, calls per client: {limit}"


def _read(path: Path | None, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{name}: cannot read {path}: {err.strerror}") from None


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call and applies the per-client limit."""

    def __init__(self, config: SecurityConfig, metrics: Metrics) -> None:
        self._clients = [token.encode() for token in config.client_tokens]
        self._admin = _secret(config.admin_token)
        limit = config.max_calls_per_client
        self._limiter = ClientLimiter(limit) if limit else None
        self._rejected = metrics.rejected_calls

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.strip("/").partition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        presented = _bearer(handler_call_details.invocation_metadata)
        identity = self._identify(presented)
        refusal = self._authorise(service, presented, identity)
        if refusal is not None:
            code, message = refusal
            self._rejected.labels(code.name).inc()
            return _refusing(handler, code, message)
        if self._limiter is not None:
            return _limited(handler, self._limiter, self._rejected, identity)
        return handler

    def _identify(self, presented: bytes | None) -> str | None:
        """Who authenticated: 'admin', 'token <n>' (the n-th client token), or None.

        Every client token is compared (in constant time each), so the time taken says
        nothing about which one matched.
        """
        identity = "admin" if _matches(presented, self._admin) else None
        for index, secret in enumerate(self._clients):
            if _matches(presented, secret):
                identity = f"token {index + 1}"
        return identity

    def _authorise(
        self, service: str, presented: bytes | None, identity: str | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        if service == ADMIN_SERVICE:
            if self._admin is None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "admin RPCs are disabled on this server (no admin token configured)",
                )
            if identity == "admin":
                return None
            if identity is not None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "authorization: the client token may not make admin calls",
                )
        elif not self._clients or identity is not None:
            return None
        if presented is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization: missing metadata 'authorization: Bearer <token>'",
            )
        return grpc.StatusCode.UNAUTHENTICATED, "authorization: invalid token"


def _secret(token: str | None) -> bytes | None:
    return None if token is None else token.encode()


def _matches(presented: bytes | None, secret: bytes | None) -> bool:
    """Constant-time comparison, so response times say nothing about a token's prefix."""
    return presented is not None and secret is not None and hmac.compare_digest(presented, secret)


def _bearer(metadata) -> bytes | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
            return b""  # present but malformed: an invalid token, not a missing one
    return None


def _rebuild(handler: grpc.RpcMethodHandler, behaviour: Callable, parse: bool = True):
    """A handler of the same streaming kind as ``handler`` running ``behaviour``.

    ``parse=False`` leaves request bytes undecoded: a refused call never parses them.
    """
    deserializer = handler.request_deserializer if parse else None
    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        behaviour,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _inner(handler: grpc.RpcMethodHandler) -> Callable:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    return _rebuild(handler, refuse, parse=False)


class ClientLimiter:
    """Calls in flight per client key, refused beyond ``limit`` (used on the I/O loop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._calls: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        count = self._calls.get(client, 0)
        if count >= self.limit:
            return False
        self._calls[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._calls[client] - 1
        if count:
            self._calls[client] = count
        else:
            del self._calls[client]

    def in_flight(self, client: str) -> int:
        return self._calls.get(client, 0)


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``; ``ipv6:[::1]:5`` -> ``ipv6:[::1]``."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() and ":" in host else peer


def _limited(handler: grpc.RpcMethodHandler, limiter: ClientLimiter, rejected, identity):
    """``handler`` counted in and out of ``limiter`` under the caller's key: its token's
    identity when it authenticated, else its peer host."""
    inner = _inner(handler)

    async def admit(context: grpc.aio.ServicerContext) -> str:
        """Count the call in, or abort it; returns the key to release."""
        client = identity or peer_host(context.peer())
        if not limiter.acquire(client):
            rejected.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            who = f"client {client}" if identity is None else "this token"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{who}: {limiter.limit} calls already in flight (the limit per client); "
                "wait for one to finish",
            )
        return client

    # A cancelled call's handler is cancelled too, so ``finally`` releases every call.
    if inspect.isasyncgenfunction(inner):

        async def generating(request, context):
            client = await admit(context)
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                limiter.release(client)

        return _rebuild(handler, generating)

    async def awaiting(request, context):
        client = await admit(context)
        try:
            return await inner(request, context)
        finally:
            limiter.release(client)

    return _rebuild(handler, awaiting)
