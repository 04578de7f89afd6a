"""How a client reaches its servers: channels, credentials, retries, round-robin.

One ``Connection`` is kept per server address for the life of a client (a gRPC channel
is expensive to open and cheap to reuse: an MD step must not pay a TCP or TLS handshake).
A bearer token travels as call metadata rather than as channel credentials, so that it
also works on a plaintext loopback channel (e.g. behind a TLS-terminating proxy).
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from crossfield.v1 import inference_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient failures.

    ``attempts`` counts the first try. Jitter spreads the retries of many clients after a
    server restart so that they do not arrive together.
    """

    attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    # CANCELLED too: a call that reaches a server while it stops is cancelled rather than
    # refused (grpc/grpc#41785); Compute is idempotent, so trying the next server is safe.
    retry_on: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retries.attempts: must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries: backoffs must be non-negative")

    def delays(self) -> Iterator[float]:
        """The waits before the 2nd, 3rd, ... attempt."""
        for attempt in range(self.attempts - 1):
            cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
            yield random.uniform(0.5 * cap, cap)


NO_RETRIES = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Security:
    """TLS and the bearer token of a client.

    ``root_certificates`` (PEM bytes) implies TLS; ``tls=True`` without them trusts the
    system's roots. ``server_name`` overrides the name checked against the certificate
    (for a certificate issued to a name other than the address dialled).
    ``client_certificate`` and ``client_key`` (PEM bytes) present a certificate to a
    server that requires mutual TLS.
    """

    tls: bool = False
    root_certificates: bytes | None = None
    token: str | None = None
    server_name: str | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key: give both or neither")

    def __repr__(self) -> str:  # never print the token or the key
        return f"Security(tls={self.uses_tls}, token={'set' if self.token else 'none'})"

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.root_certificates is not None or self.client_certificate is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_options(self, max_message_bytes: int) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # A DNS name with several A records (a Kubernetes headless Service) is
            # balanced call by call; for a single address this changes nothing.
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )


def open_channel(address: str, security: Security, max_message_bytes: int, aio: bool = False):
    """A sync (or ``grpc.aio``) channel to one address."""
    module = grpc.aio if aio else grpc
    options = security.channel_options(max_message_bytes)
    if security.uses_tls:
        return module.secure_channel(address, security.credentials(), options=options)
    return module.insecure_channel(address, options=options)


class Connection:
    """One server address: its channel and Inference stub."""

    def __init__(self, address: str, security: Security, max_message_bytes: int, aio: bool = False):
        self.address = address
        self.channel = open_channel(address, security, max_message_bytes, aio=aio)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)


class RoundRobin:
    """Hands out connections in turn; thread-safe.

    Client-side balancing over explicit addresses (several replicas, each with its own
    address). For a DNS name with many A records (a Kubernetes headless Service), one
    address ``dns:///name:port`` with gRPC's own round_robin policy is the alternative.
    """

    def __init__(self, connections: Sequence[Connection]) -> None:
        if not connections:
            raise ValueError("address: need at least one server address")
        self.connections = list(connections)
        self._cycle = itertools.cycle(self.connections)
        self._lock = threading.Lock()

    def next(self) -> Connection:
        with self._lock:
            return next(self._cycle)

    def after(self, failed: Connection) -> Connection:
        """The connection after ``failed``: a retry moves on from the server that failed,
        not from a cursor that other threads advance meanwhile."""
        index = self.connections.index(failed)
        return self.connections[(index + 1) % len(self.connections)]

    def __len__(self) -> int:
        return len(self.connections)


def normalise_addresses(address: str | Sequence[str]) -> list[str]:
    """One address or several (a list, or a comma-separated string) as a list."""
    if isinstance(address, str):
        addresses = [a.strip() for a in address.split(",")]
    else:
        addresses = [str(a).strip() for a in address]
    addresses = [a for a in addresses if a]
    if not addresses:
        raise ValueError("address: need at least one server address, e.g. 'localhost:50051'")
    return addresses
