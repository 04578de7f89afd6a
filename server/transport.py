"""The HTTP/2 side of the server: the gRPC channel arguments a fleet replica needs.

- **Streams per connection** (``grpc.max_concurrent_streams``): one connection cannot open
  more; gRPC refuses the excess streams (RST_STREAM), so a client that opens hundreds of
  HEADERS-only streams on one connection holds at most this many.
- **Keepalive enforcement**, matched to the pings ``crossfield.client`` sends (every 30 s,
  only while calls are active, see ``client/connection.py``): the server accepts pings as
  often as every ``min_ping_interval`` (a third of the client's period, so jitter never
  counts against it) and answers faster pings with GOAWAY (too_many_pings) after
  gRPC's two strikes. It pings quiet connections itself every ``keepalive_time`` and drops
  those that do not answer within ``keepalive_timeout``: a client that vanished (a killed
  node, a dropped NAT entry) does not keep its streams open forever.
- **Connection age** (``max_connection_age``, gRPC adds +-10 % jitter): a connection is
  sent GOAWAY once this old, so clients reconnect and DNS round-robin spreads them over
  replicas added since they connected. Calls in progress continue for up to
  ``max_connection_age_grace`` (None: until they end), so a long stream is not cut.
"""

from __future__ import annotations

from dataclasses import dataclass

NEVER = 2**31 - 1  # gRPC's "infinite" for millisecond arguments


@dataclass(frozen=True)
class Transport:
    """HTTP/2 limits and timers of the gRPC server (seconds)."""

    max_streams_per_connection: int = 100
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_ping_interval: float = 10.0
    max_connection_age: float | None = 1800.0  # None: connections live as long as they like
    max_connection_age_grace: float | None = None  # None: calls run to their end

    def __post_init__(self) -> None:
        if self.max_streams_per_connection < 1:
            raise ValueError(
                f"max_streams_per_connection: must be >= 1, got {self.max_streams_per_connection}"
            )
        for name in ("keepalive_time", "keepalive_timeout", "min_ping_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0 seconds, got {getattr(self, name)}")
        for name in ("max_connection_age", "max_connection_age_grace"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0 seconds (or None: never), got {value}")

    def options(self) -> list[tuple[str, int]]:
        """The channel arguments for ``grpc.aio.server``."""
        age = self.max_connection_age
        grace = self.max_connection_age_grace
        return [
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_age_ms", NEVER if age is None else _ms(age)),
            ("grpc.max_connection_age_grace_ms", NEVER if grace is None else _ms(grace)),
        ]


def _ms(seconds: float) -> int:
    return max(1, min(NEVER, round(seconds * 1000)))
