"""How a client reaches its servers: channels, credentials, retries, keepalive, fail-over.

One ``Connection`` is kept per server address for the life of a client (a gRPC channel
is expensive to open and cheap to reuse: an MD step must not pay a TCP or TLS handshake).
A bearer token travels as call metadata rather than as channel credentials, so that it
also works on a plaintext loopback channel (e.g. behind a TLS-terminating proxy).

Retries are split between gRPC and the client, by what each can see:

- **On one channel**, gRPC's own retry policy (the channel's service config) retries a
  unary call the server refused for now: RESOURCE_EXHAUSTED (a full queue) and CANCELLED
  (a call that reached a server while it stopped, grpc/grpc#41785), with exponential
  backoff and honouring the server's pushback (``grpc-retry-pushback-ms``: when to come
  back, or not at all). gRPC also retries transparently what never left the client.
  Streams get no policy: what a stream leaves unanswered is resent by the client
  (``work.Ledger``, ``Session``), and with a policy, grpcio 1.85 now and then left a
  stream that failed as it opened (its server gone) with its status delivered but its
  pending read never completed, so the reader waited forever (the restart soak's hung
  ``compute_many``: 2 runs in 7 with a policy on streams, none in 24 without).
- **Across addresses**, the client moves a failed call on to the next server
  (``RoundRobin``). UNAVAILABLE stays with the client, not the channel, because only the
  client can count how many servers went away while a structure was in flight: a
  structure in flight on two servers that went away is failed as poison
  (``errors.PoisonStructureError``) instead of being sent to a third (streams: the rules
  are in ``work.py``). A structure the server itself marked as poison (INVALID_ARGUMENT
  with trailing metadata ``crossfield-poison``) is never retried.
- **Wait for ready**: a call waits for a server to come up, within its deadline, instead
  of failing at once (a client started before its server, a replica restarting). With
  several addresses, ``pick`` waits for one that is up and the call itself fails at once
  if that one has gone meanwhile (``RoundRobin.waits_for_ready``).

Keepalive (what a server must permit; the server's enforcement matches these values):
the client pings an idle connection every ``KEEPALIVE_TIME_S`` seconds only while calls
are open (never on a connection without calls), gives up on a server that does not
answer a ping within ``KEEPALIVE_TIMEOUT_S`` (a frozen or partitioned replica: its calls
fail over instead of hanging), and keeps pinging through long quiet streams. A server
must therefore accept pings ``KEEPALIVE_TIME_S`` apart with no data in between (the
server's ``grpc.http2.min_ping_interval_without_data_ms`` below 30 s with a margin for
timer jitter; ``server/transport.py`` allows 10 s), or it answers GOAWAY
"too_many_pings" and the client's calls fail.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from crossfield.client.errors import (
    CrossfieldError,
    DeadlineExceededError,
    ServerUnavailableError,
    never_sent,
)
from crossfield.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
INFERENCE_SERVICE = _INFERENCE.full_name
# The calls gRPC's retry policy covers (module docstring): those with one request and one answer.
UNARY_METHODS = tuple(
    m.name for m in _INFERENCE.methods if not (m.client_streaming or m.server_streaming)
)

KEEPALIVE_TIME_S = 30
KEEPALIVE_TIMEOUT_S = 10
# Reconnection to a server that went away: first after 0.25 s (gRPC's default is 1 s),
# growing to at most 5 s (gRPC's default is 120 s, far too long for a client waiting for
# a replica that restarts in seconds). A refused connection costs the server nothing.
INITIAL_RECONNECT_BACKOFF_S = 0.25
MAX_RECONNECT_BACKOFF_S = 5
# gRPC caps maxAttempts of a service-config retry policy at 5.
GRPC_MAX_ATTEMPTS = 5

READY = grpc.ChannelConnectivity.READY
TRANSIENT_FAILURE = grpc.ChannelConnectivity.TRANSIENT_FAILURE
SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient failures, and poison control.

    ``attempts`` counts the first try. Jitter spreads the retries of many clients after a
    server restart so that they do not arrive together. ``retry_on`` are the statuses the
    client moves to the next server on (the channel itself retries RESOURCE_EXHAUSTED and
    CANCELLED on its server first, see the module docstring). ``poison_after``: a
    structure that was in flight when this many servers went away (UNAVAILABLE, and the
    server no longer answers) is failed with ``PoisonStructureError`` rather than sent to
    another server; None never gives up on a structure for that reason.
    """

    attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_on: tuple[str, ...] = ("UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED")
    poison_after: int | None = 2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retries.attempts: must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries: backoffs must be non-negative")
        if self.poison_after is not None and self.poison_after < 1:
            raise ValueError(f"retries.poison_after: must be >= 1 or None, got {self.poison_after}")

    def delays(self) -> Iterator[float]:
        """The waits before the 2nd, 3rd, ... attempt."""
        for attempt in range(self.attempts - 1):
            yield self.delay(attempt)

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt + 1`` (0-based), jittered."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return random.uniform(0.5 * cap, cap)

    def service_config(self) -> dict:
        """The channel's retry policy for what a server refused for now (see module)."""
        names = [{"service": INFERENCE_SERVICE, "method": m} for m in UNARY_METHODS]
        config: dict = {"methodConfig": [{"name": names}]}
        if self.attempts > 1:
            config["methodConfig"][0]["retryPolicy"] = {
                "maxAttempts": min(self.attempts, GRPC_MAX_ATTEMPTS),
                "initialBackoff": f"{max(self.initial_backoff, 0.001):.3f}s",
                "maxBackoff": f"{max(self.max_backoff, 0.001):.3f}s",
                "backoffMultiplier": max(self.multiplier, 1.0),
                "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "CANCELLED"],
            }
            # gRPC's token bucket: every failed call takes a token, every answered one gives
            # one back, and retries stop while half the bucket is gone. A burst at a full
            # queue is retried; a server that refuses most calls is not retried into the
            # ground. (A bucket of 10, the common example, stopped the retries of 12
            # callers at a queue of 2 after a few refusals.)
            config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 1.0}
        return config


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

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )


def channel_options(
    security: Security, max_message_bytes: int, retries: RetryPolicy
) -> list[tuple[str, object]]:
    """Message limits, keepalive, reconnection and retry settings of every channel."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
        # 0: no limit on pings without data, so a quiet stream still notices a dead server
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", int(INITIAL_RECONNECT_BACKOFF_S * 1000)),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_S * 1000),
        # Never idle: round_robin then reconnects to a server that went away at once,
        # so the channel's state says whether the server is up (``RoundRobin.pick``).
        ("grpc.client_idle_timeout_ms", 2**31 - 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(retries.service_config())),
        # A DNS name with several A records (a Kubernetes headless Service) is
        # balanced call by call; for a single address this changes nothing.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return options


def open_channel(
    address: str,
    security: Security,
    max_message_bytes: int,
    retries: RetryPolicy,
    aio: bool = False,
):
    """A sync (or ``grpc.aio``) channel to one address."""
    module = grpc.aio if aio else grpc
    options = channel_options(security, max_message_bytes, retries)
    if security.uses_tls:
        return module.secure_channel(address, security.credentials(), options=options)
    return module.insecure_channel(address, options=options)


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
PROBE_TIMEOUT_S = 1.0
# How long a failed probe keeps a connection counted down while its channel says READY:
# longer than a probe, shorter than the keepalive that would notice a dead server.
SUSPECT_S = 3.0


def as_bytes(data: bytes) -> bytes:
    return data


def probe_failed(error: grpc.RpcError) -> bool:
    """Whether a health probe's failure means that nothing answers at the address: any
    status the server itself sent (even UNIMPLEMENTED or UNAUTHENTICATED) says it lives."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Connection:
    """One server address: its channel, Inference stub and connectivity.

    The channel connects at once, never goes idle, and its state is followed, so that a
    call can go to a server that is up (``RoundRobin.pick``) and wait for one that is
    coming up.
    """

    def __init__(
        self,
        address: str,
        security: Security,
        max_message_bytes: int,
        retries: RetryPolicy,
        changed: threading.Condition,
    ) -> None:
        self.address = address
        self.channel = open_channel(address, security, max_message_bytes, retries)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self._probe = self.channel.unary_unary(
            HEALTH_CHECK, request_serializer=as_bytes, response_deserializer=as_bytes
        )
        self._changed = changed
        self._reported = grpc.ChannelConnectivity.IDLE  # what the channel said last
        self._down_until = 0.0  # a failed probe counts the server down until then
        self.channel.subscribe(self._track, try_to_connect=True)

    @property
    def state(self) -> grpc.ChannelConnectivity:
        """The channel's state, or TRANSIENT_FAILURE for ``SUSPECT_S`` after a failed
        probe (``answers``). The suspicion expires: a probe that timed out on a busy
        machine must not keep a live server out of use, since a channel that stays
        connected reports no change that would clear it."""
        if self._reported == READY and time.monotonic() < self._down_until:
            return TRANSIENT_FAILURE
        return self._reported

    def _track(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self._reported = state
            self._down_until = 0.0
            self._changed.notify_all()

    def answers(self) -> bool:
        """Whether a server answers at this address right now (a health probe that does
        not wait for a connection). After a call failed with UNAVAILABLE this tells a
        server that went away (crashed, stopped, frozen) from one that answered
        UNAVAILABLE itself (e.g. no model loaded yet)."""
        try:
            self._probe(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            if not probe_failed(err):
                return True
            # Down, whatever the channel last reported: its state reaches us from a polling
            # thread, and a call sent on a stale READY would wait for this server until its
            # deadline. The channel's next change (reconnecting, or READY) overrides this,
            # and so does time (``state``).
            with self._changed:
                self._down_until = time.monotonic() + SUSPECT_S
                self._changed.notify_all()
            return False
        return True

    def went_away(self, error: CrossfieldError) -> bool:
        """Whether ``error``, from a call to this server, means the server went away
        (crashed, stopped, frozen) with the call in flight, rather than refused it:
        UNAVAILABLE, no answer now, and the call was sent. Structures in flight then
        count towards ``RetryPolicy.poison_after``. A server found gone is passed over
        by ``pick`` for a while (``answers``), whether or not the call reached it."""
        if error.code != "UNAVAILABLE":
            return False
        return not self.answers() and not never_sent(error)

    def why_unreachable(self) -> str:
        """What gRPC says when a call cannot reach this address (for error messages)."""
        try:
            self._probe(b"", timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as err:
            return f"{self.address}: {err.details()}"
        return f"{self.address}: reachable now"

    def close(self) -> None:
        self.channel.unsubscribe(self._track)
        self.channel.close()


class RoundRobin:
    """Hands out connections in turn, preferring servers that are up; thread-safe.

    Client-side balancing over explicit addresses (several replicas, each with its own
    address). For a DNS name with many A records (a Kubernetes headless Service), one
    address ``dns:///name:port`` with gRPC's own round_robin policy is the alternative.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        security: Security,
        max_message_bytes: int,
        retries: RetryPolicy,
    ) -> None:
        if not addresses:
            raise ValueError("address: need at least one server address")
        self._changed = threading.Condition()
        self.connections = [
            Connection(a, security, max_message_bytes, retries, self._changed) for a in addresses
        ]
        self._cycle = itertools.cycle(self.connections)
        self._lock = threading.Lock()

    def next(self) -> Connection:
        with self._lock:
            return next(self._cycle)

    @property
    def waits_for_ready(self) -> bool:
        """Whether a call waits for its server to come up (gRPC's ``wait_for_ready``):
        only with one address, where there is nowhere else to go. With several, a call
        fails at once on a server that went away and moves on to the next: ``pick`` saw
        it up, but its state reaches us late (a polling thread), and a waiting call sent
        in that gap would wait for the gone replica until its deadline, while the others
        answer (seen as a 30 s DEADLINE_EXCEEDED while one replica of two drained)."""
        return len(self.connections) == 1

    def after(self, failed: Connection) -> Connection:
        """The connection after ``failed``: a retry moves on from the server that failed,
        not from a cursor that other threads advance meanwhile."""
        index = self.connections.index(failed)
        return self.connections[(index + 1) % len(self.connections)]

    def pick(self, deadline: float | None, after: Connection | None = None) -> Connection | None:
        """The connection for the next call: the next in turn whose server is up, waiting
        for one that is still connecting; when none is up, the first to come up before
        ``deadline`` (None: wait as long as it takes). None when the deadline passed."""
        first = self.next() if after is None else self.after(after)
        start = self.connections.index(first)
        order = self.connections[start:] + self.connections[:start]
        with self._changed:
            for connection in order:
                if not self._wait(lambda c=connection: c.state not in _UNSETTLED, deadline):
                    return None
                if connection.state == READY:
                    return connection
            if self._wait(lambda: any(c.state == READY for c in order), deadline):
                return next(c for c in order if c.state == READY)
        return None

    def _wait(self, settled, deadline: float | None) -> bool:
        """Wait (holding ``_changed``) until ``settled()``; False at the deadline. Wakes
        at least every ``SUSPECT_S``, when a suspicion may have expired unannounced."""
        while not settled():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._changed.wait(SUSPECT_S if remaining is None else min(remaining, SUSPECT_S))
        return True

    def wait_ready(self, connection: Connection, deadline: float | None, stop) -> bool:
        """Wait until ``connection``'s server is up; False at the deadline or once
        ``stop()`` is true (checked every few tens of milliseconds)."""
        with self._changed:
            while connection.state != READY:
                if stop():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def unreachable(self, what: str, timeout: float | None) -> str:
        """Why no server took a call, for ``ServerUnavailableError``."""
        reasons = "; ".join(c.why_unreachable() for c in self.connections)
        return f"{what}: no server reachable within {timeout} s ({reasons})"

    def no_server(self, what: str, timeout: float | None) -> CrossfieldError:
        """The error of a call whose deadline passed before a server took it: no server
        reachable if every connection failed, else the deadline (too short to connect)."""
        if any(c.state not in (TRANSIENT_FAILURE, SHUTDOWN) for c in self.connections):
            return DeadlineExceededError(
                f"{what}: no answer within {timeout} s", "DEADLINE_EXCEEDED"
            )
        return ServerUnavailableError(self.unreachable(what, timeout), "UNAVAILABLE")

    def close(self) -> None:
        for connection in self.connections:
            connection.close()

    def __len__(self) -> int:
        return len(self.connections)


_UNSETTLED = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


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
