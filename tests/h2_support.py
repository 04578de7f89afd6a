"""A raw HTTP/2 client for attacks no gRPC client makes: streams beyond the server's
advertised limit, HEADERS without a message, pings faster than allowed.

Built on ``h2`` (the HTTP/2 state machine of python-hyper), talking to the server over a
plain socket, so what the server sees is exactly the frames written here.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.settings import SettingCodes

GOAWAY_FRAME = 0x7


@dataclass
class Observed:
    """What came back on one connection."""

    resets: dict[int, int] = field(default_factory=dict)  # error code -> streams reset
    goaway: int | None = None  # error code of a GOAWAY, once one came
    goaway_data: bytes = b""
    closed: bool = False


class RawConnection:
    """One plaintext HTTP/2 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.observed = Observed()
        self._pending = b""  # bytes of a frame not yet complete
        self._flush()

    def open_streams(self, count: int, path: str) -> None:
        """``count`` streams of HEADERS only (no message, no END_STREAM), ignoring the
        server's SETTINGS_MAX_CONCURRENT_STREAMS as an attacker would."""
        self.h2.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        for _ in range(count):
            self.h2.send_headers(self.h2.get_next_available_stream_id(), headers)
        self._flush()

    def ping(self) -> None:
        """A PING frame; none once the server has said GOAWAY."""
        if self.observed.goaway is not None or self.observed.closed:
            return
        self.h2.ping(b"12345678")
        self._flush()

    def read(self, seconds: float) -> Observed:
        """Process what the server sends for ``seconds`` (or until it closes)."""
        end = time.monotonic() + seconds
        self.socket.settimeout(0.05)
        while time.monotonic() < end and not self.observed.closed:
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            if not data:
                self.observed.closed = True
                break
            self._receive(data)
        return self.observed

    def _receive(self, data: bytes) -> None:
        self._scan_for_goaway(data)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 refuses frames after a GOAWAY (gRPC still pings); the scan saw it
            self.observed.closed = True
            return
        for event in events:
            if isinstance(event, h2.events.StreamReset):
                code = int(event.error_code)
                self.observed.resets[code] = self.observed.resets.get(code, 0) + 1
        self._flush()

    def _scan_for_goaway(self, data: bytes) -> None:
        """Find GOAWAY frames in the raw bytes: h2 stops at the first frame it refuses
        after one, so its events may never report it."""
        self._pending += data
        while len(self._pending) >= 9:
            length = int.from_bytes(self._pending[:3], "big")
            if len(self._pending) < 9 + length:
                return
            kind, payload = self._pending[3], self._pending[9 : 9 + length]
            self._pending = self._pending[9 + length :]
            if kind == GOAWAY_FRAME and self.observed.goaway is None:
                self.observed.goaway = int.from_bytes(payload[4:8], "big")
                self.observed.goaway_data = payload[8:]

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                self.socket.sendall(data)
            except OSError:
                self.observed.closed = True

    def close(self) -> None:
        self.socket.close()
