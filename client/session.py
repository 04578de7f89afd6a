"""``Session``: an MD session, the structure sent once and then only its new positions.

A ``ComputeSession`` call lives on one server, which keeps the structure's neighbour list
between steps (see the .proto). ``Session.compute`` sends a start whenever the atoms,
their periodicity or the session itself are new, and otherwise a step with the positions
(and the cell when it changed); answers are ``Result``s as ``Client.compute`` returns
them, and a refused step raises as a refused Compute call would.

A session that ends (the server stopped or restarted, the session stayed idle, the
connection dropped) is opened again on the next server that is up, starting from the
structure being evaluated, with the same backoff and retry budget as unary calls and the
same poison control (``RetryPolicy.poison_after``). A server without sessions answers
UNIMPLEMENTED, raised as ``SessionsUnsupportedError`` so that a caller can fall back to
``Client.compute``.

The deadline of a step is kept by a watchdog thread, which cancels the call of a step
that outlives it (a gRPC stream has one deadline for its whole life, and sessions live
for hours).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np

from crossfield.client.connection import Connection, RetryPolicy, RoundRobin
from crossfield.client.errors import (
    CrossfieldError,
    DeadlineExceededError,
    RemoteError,
    from_rpc_error,
    lost_in_flight,
)
from crossfield.client.results import Result, atoms_request, response_result
from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import to_array

WATCH_INTERVAL_S = 0.1  # how late a step's deadline may be noticed


class SessionsUnsupportedError(RemoteError):
    """The server has no ComputeSession (an older server): use ``Client.compute``."""


class Session:
    """One MD driver's session on a set of servers (not thread-safe: one driver).

    ``request`` holds the model, version, head and allow_extrapolation of every start;
    ``timeout`` is the deadline of one evaluation, reopening included.
    """

    def __init__(
        self,
        servers: RoundRobin,
        metadata: Sequence[tuple[str, str]],
        retries: RetryPolicy,
        timeout: float | None,
        request: dict,
    ) -> None:
        self._servers = servers
        self._metadata = tuple(metadata)
        self._retries = retries
        self._timeout = timeout
        self._request = request
        self._call = None
        self._requests: queue.SimpleQueue | None = None
        self._connection: Connection | None = None
        self._reopen_after: Connection | None = None  # whose session failed last
        self._held: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._start_properties: tuple[str, ...] = ()
        self._watchdog = _Watchdog()

    def compute(self, atoms, properties: Sequence[str]) -> Result:
        """Evaluate ``atoms`` (``properties`` in ASE's names) in the session."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        lost: list[str] = []
        failures = 0
        while True:
            try:
                return self._evaluate(atoms, tuple(properties), deadline)
            except grpc.RpcError as err:  # the session's call is over
                error = self._ended(err)
                connection, self._connection = self._connection, None
                self._reopen_after = connection  # the next session: on the next server
                if error.code == "UNIMPLEMENTED":
                    raise SessionsUnsupportedError(error.details, error.code) from None
                if connection and connection.went_away(error):
                    lost.append(connection.address)
                    limit = self._retries.poison_after
                    if limit is not None and len(lost) >= limit:
                        raise lost_in_flight(lost, "structure") from None
            except CrossfieldError as err:  # answered with an error; the session goes on
                if err.code not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                    raise
                error = err
            failures += 1
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if (
                error.code not in self._retries.retry_on
                or failures >= self._retries.attempts
                or out_of_time
            ):
                raise error from None
            delay = self._retries.delay(failures - 1)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    def _evaluate(self, atoms, properties: tuple[str, ...], deadline: float | None) -> Result:
        if self._call is None:
            self._open(deadline)
        message, held = self._message(atoms, properties)
        self._requests.put(message)
        self._watchdog.arm(self._call, deadline)
        try:
            response = next(self._call)
        finally:
            self._watchdog.disarm()
        result = response_result(response)
        if result.error is not None:
            raise result.error
        self._held = held
        if deadline is not None and time.monotonic() > deadline:
            # the watchdog polls, so a quick answer may beat it; as a unary call, late is
            # an error (the session itself goes on)
            raise DeadlineExceededError(
                f"ComputeSession: no answer within {self._timeout} s", "DEADLINE_EXCEEDED"
            )
        return result

    def _message(self, atoms, properties: tuple[str, ...]):
        """The message for ``atoms`` (a step when the server holds the same atoms) and
        what the server holds once it is answered."""
        numbers = np.asarray(atoms.numbers)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = atoms.cell.array if pbc.any() else None
        held = self._held
        if (
            held is None
            or not np.array_equal(held[0], numbers)
            or not np.array_equal(held[1], pbc)
            or (held[2] is None) != (cell is None)
        ):
            self._start_properties = properties
            start = atoms_request(atoms, properties, **self._request)
            return inference_pb2.SessionRequest(start=start), (numbers.copy(), pbc, _copy(cell))
        step = inference_pb2.SessionStep(positions=to_array(atoms.positions, "float64"))
        if cell is not None and not np.array_equal(cell, held[2]):
            step.cell.CopyFrom(to_array(cell, "float64"))
        if properties != self._start_properties:  # e.g. stress, once a cell filter asks
            step.properties.extend(atoms_request(atoms, properties).properties)
        return inference_pb2.SessionRequest(step=step), (held[0], held[1], _copy(cell))

    def _open(self, deadline: float | None) -> None:
        """A new session on the next server that is up (within ``deadline``), after the
        one whose session just failed."""
        connection = self._servers.pick(deadline, after=self._reopen_after)
        if connection is None:
            raise self._servers.no_server("ComputeSession", self._timeout)
        self._requests = queue.SimpleQueue()
        self._call = connection.stub.ComputeSession(
            iter(self._requests.get, None),
            metadata=self._metadata,
            wait_for_ready=self._servers.waits_for_ready,
        )
        self._connection = connection
        self._reopen_after = None
        self._held = None  # a new session holds nothing

    def _ended(self, error: grpc.RpcError) -> CrossfieldError:
        """The session's call is over: why, as the error to raise or retry."""
        self._close_call()
        if self._watchdog.expired:
            return DeadlineExceededError(
                f"ComputeSession: no answer within {self._timeout} s", "DEADLINE_EXCEEDED"
            )
        return from_rpc_error(error)

    def _close_call(self) -> None:
        if self._call is not None:
            self._requests.put(None)
            self._call.cancel()
        self._call = self._requests = None
        self._held = None

    def close(self) -> None:
        """End the session (the server forgets the structure) and its watchdog."""
        self._close_call()
        self._watchdog.stop()


def _copy(cell: np.ndarray | None) -> np.ndarray | None:
    return None if cell is None else np.array(cell, dtype=np.float64)


class _Watchdog:
    """Cancels a session's call when the step in flight outlives its deadline.

    It polls (every ``WATCH_INTERVAL_S``) rather than being woken for every step, so an
    MD step costs it nothing; it starts with the first step that has a deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call = None
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.expired = False

    def arm(self, call, deadline: float | None) -> None:
        with self._lock:
            self._call, self._deadline, self.expired = call, deadline, False
        if deadline is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="session-watchdog", daemon=True)
            self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self._call = self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            with self._lock:
                if self._deadline is None or time.monotonic() < self._deadline:
                    continue
                call, self._call, self._deadline = self._call, None, None
                self.expired = True
            call.cancel()
