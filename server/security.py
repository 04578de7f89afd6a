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

The concurrency limit counts the calls in flight per client, keyed by the peer's address
without its port (one machine, however many channels it opens); beyond the limit a call is
answered RESOURCE_EXHAUSTED at once, so one greedy client cannot occupy every handler
thread of the server.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator
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
    it. ``max_calls_per_client`` 0 means no limit.
    """

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    max_calls_per_client: int = 0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both (the certificate and its key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mutual TLS needs tls_cert and tls_key as well")
        for name in ("token", "admin_token"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name}: must not be empty")
        if self.token is not None and self.token == self.admin_token:
            raise ValueError("admin_token: must differ from the client token")
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
        token = "client token" if self.token else "no client token (inference open)"
        admin = "admin token" if self.admin_token else "admin RPCs disabled (no admin token)"
        limit = self.max_calls_per_client or "unlimited"
        return f"{tls}, {token}, {admin}, calls per client: {limit}"


def _read(path: Path | None, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{name}: cannot read {path}: {err.strerror}") from None


class SecurityInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token of every call and applies the per-client limit."""

    def __init__(self, config: SecurityConfig, metrics: Metrics) -> None:
        self._client = _secret(config.token)
        self._admin = _secret(config.admin_token)
        limit = config.max_calls_per_client
        self._limiter = ClientLimiter(limit) if limit else None
        self._rejected = metrics.rejected_calls

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service = handler_call_details.method.strip("/").partition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler
        presented = _bearer(handler_call_details.invocation_metadata)
        refusal = self._authorise(service, presented)
        if refusal is not None:
            code, message = refusal
            self._rejected.labels(code.name).inc()
            return _refusing(handler, code, message)
        if self._limiter is not None:
            return _limited(handler, self._limiter, self._rejected)
        return handler

    def _authorise(
        self, service: str, presented: bytes | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        is_admin = _matches(presented, self._admin)
        is_client = _matches(presented, self._client)
        if service == ADMIN_SERVICE:
            if self._admin is None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "admin RPCs are disabled on this server (no admin token configured)",
                )
            if is_admin:
                return None
            if is_client:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "authorization: the client token may not make admin calls",
                )
        elif self._client is None or is_client or is_admin:
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
    def refuse(request, context: grpc.ServicerContext):
        context.abort(code, message)

    return _rebuild(handler, refuse, parse=False)


class ClientLimiter:
    """Calls in flight per client (peer host), refused beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        with self._lock:
            count = self._calls.get(client, 0)
            if count >= self.limit:
                return False
            self._calls[client] = count + 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            count = self._calls[client] - 1
            if count:
                self._calls[client] = count
            else:
                del self._calls[client]

    def in_flight(self, client: str) -> int:
        with self._lock:
            return self._calls.get(client, 0)


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``; ``ipv6:[::1]:5`` -> ``ipv6:[::1]``."""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() and ":" in host else peer


def _limited(handler: grpc.RpcMethodHandler, limiter: ClientLimiter, rejected):
    inner = _inner(handler)

    def admit(context: grpc.ServicerContext) -> Callable[[], None]:
        """Count the call in, or abort it; returns the (idempotent) release."""
        client = peer_host(context.peer())
        if not limiter.acquire(client):
            rejected.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client}: {limiter.limit} calls already in flight (the limit per "
                "client); wait for one to finish",
            )
        released = threading.Event()
        lock = threading.Lock()

        def release() -> None:
            with lock:
                if released.is_set():
                    return
                released.set()
            limiter.release(client)

        return release

    if not handler.response_streaming:

        def unary(request, context):
            release = admit(context)
            try:
                return inner(request, context)
            finally:
                release()

        return _rebuild(handler, unary)

    def streaming(request, context) -> Iterator:
        release = admit(context)
        # A cancelled stream is never iterated to its end: the termination callback
        # releases it; the generator's own end releases a completed one at once.
        if not context.add_callback(release):
            release()

        def responses():
            try:
                yield from inner(request, context)
            finally:
                release()

        return responses()

    return _rebuild(handler, streaming)
