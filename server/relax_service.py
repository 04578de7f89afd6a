# ruff: noqa: N802 - the RPC method name (Relax) is gRPC's
"""The gRPC Relaxation service on ``grpc.aio``: RelaxRequest -> ``Relaxation`` -> answer.

A Relax call is a stream: every structure read is checked as a Compute request would be
(plus its settings), handed to the server's ``RelaxEngine`` and answered once, whenever
it ends, in any order. A structure refused at the start, or failing later, gets an answer
with its status and the stream goes on. A message with ``cancel`` withdraws the structure
of that id; the call's deadline, and a structure's own ``timeout``, end structures with
DEADLINE_EXCEEDED and their last state; a call that ends early withdraws what it had in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque

import grpc
import numpy as np

from crossfield.v1 import inference_pb2, relax_pb2, relax_pb2_grpc
from crossfield.v1.arrays import from_array, to_array
from crossfield.v1.messages import structure_message

from .admission import check_names, describe
from .errors import InvalidArgumentError, ServeError
from .inline import OpenCalls
from .metrics import Metrics
from .models import ModelRegistry
from .relax_engine import Frame, Outcome, Relaxation, RelaxEngine, Settings
from .responses import clip, status_code
from .streams import (
    OpenStreams,
    StreamLimits,
    abort_unavailable,
    call_deadline,
    deadline_passed,
    wake_or_deadline,
    write_response,
)
from .validation import check_request, resolve_head
from .wire import Malformed

log = logging.getLogger(__name__)

SERVICE = relax_pb2.DESCRIPTOR.services_by_name["Relaxation"]
OPTIMIZER_NAMES = {
    relax_pb2.OPTIMIZER_UNSPECIFIED: "fire",
    relax_pb2.OPTIMIZER_FIRE: "fire",
    relax_pb2.OPTIMIZER_LBFGS: "lbfgs",
}
DEFAULT_FMAX = 0.05
DEFAULT_MAX_STEPS = 500
MAX_STEPS = 100_000
ANSWER_OVERHEAD = 512  # bytes of an answer beyond its frames (ids, names, status)
MESSAGES = {
    "idle": "relax stream idle: nothing received for {timeout} while nothing was in "
    "progress (the server's --stream-idle-timeout); open a new stream when there is work",
    "unread": "relax stream not read: an answer waited {timeout} for the client to take it "
    "(the server's --stream-idle-timeout); its relaxations were cancelled",
    "stopping": "server stopping: every relaxation of this stream was answered, those not "
    "finished UNAVAILABLE with their last state, from which another server can go on",
}


class RelaxService(relax_pb2_grpc.RelaxationServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        engine: RelaxEngine,
        metrics: Metrics,
        limits: StreamLimits,
        max_message_bytes: int,
        calls: OpenCalls,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._metrics = metrics
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._streams = OpenStreams()
        self._calls = calls  # the server's, shared with the Inference service

    def stop_streams(self) -> None:
        """The server stops (after the engine answered every relaxation): each open stream
        writes its answers and ends UNAVAILABLE (call on the I/O loop)."""
        self._streams.stop()

    async def Relax(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        stream = RelaxStream(
            self._registry,
            self._engine,
            context,
            self._metrics,
            self._limits,
            self._max_message_bytes,
        )
        with self._calls.open():
            await self._streams.serve(stream, request_iterator)


class RelaxStream:
    """One open Relax call (lives on the I/O loop).

    It holds what it has read and not yet delivered (structures relaxing, answers not yet
    written) within ``limits.window_bytes``, counting each structure at the size of its
    largest answer: a client that sends without reading stops being read, and one that
    takes no answer for ``limits.idle_timeout`` loses the call (UNAVAILABLE) and its
    relaxations, so that it cannot pin the server's memory or the relaxation engine."""

    def __init__(
        self,
        registry: ModelRegistry,
        engine: RelaxEngine,
        context: grpc.aio.ServicerContext,
        metrics: Metrics,
        limits: StreamLimits,
        max_message_bytes: int,
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._context = context
        self._metrics = metrics
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._deadline = call_deadline(context)
        self._loop = asyncio.get_running_loop()
        self._answers: deque[tuple[relax_pb2.RelaxResponse, int]] = deque()  # and its cost
        self._open: dict[str, tuple[Relaxation, int]] = {}  # id -> (relaxation, cost)
        self._held = 0  # bytes (estimated) of the open relaxations and unwritten answers
        self._reading = False  # waiting for the client's next message
        self._read_done = False
        self._stopping = False
        self._progress = self._loop.time()  # last message read or answer written
        self._wake = asyncio.Event()  # an answer, the end of reading, or room
        self._room = asyncio.Event()

    def stop(self) -> None:
        """The server stops: read nothing more, write what is answered, then end."""
        self._stopping = True
        self._wake.set()

    async def run(self, requests) -> None:
        self._metrics.open_streams.inc()
        reader = asyncio.create_task(self._read(requests))
        reason = "cancelled"
        try:
            reason = await self._write_all()
        except asyncio.CancelledError:
            reason = "deadline" if deadline_passed(self._context) else "cancelled"
            raise
        finally:
            reader.cancel()
            for relaxation, _ in self._open.values():  # the call ended under them
                self._engine.cancel(relaxation)
            self._metrics.stream_held_bytes.dec(self._held)
            self._metrics.streams_ended.labels(reason).inc()
            self._metrics.open_streams.dec()
        if reason in MESSAGES:
            await abort_unavailable(self._context, MESSAGES[reason], self._limits)

    async def _write_all(self) -> str:
        """Write answers as they come; returns why the stream ends."""
        timeout = self._limits.idle_timeout
        while True:
            if self._answers:
                answer, cost = self._answers.popleft()
                written = await write_response(self._context, answer, self._limits)
                self._release(cost)
                self._progress = self._loop.time()
                if written != "written":
                    return written
                continue
            if self._read_done and not self._open:
                return "completed"
            if self._stopping and not self._open:
                return "stopping"
            self._wake.clear()
            idle_at = None
            if timeout and self._reading and not self._open:
                idle_at = self._progress + timeout
                if idle_at <= self._loop.time():
                    return "idle"
            await wake_or_deadline(self._loop, self._wake, idle_at)

    async def _read(self, requests) -> None:
        iterator = requests.__aiter__()
        try:
            while True:
                self._reading = True
                self._wake.set()  # the idle clock may start now
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._reading = False
                self._progress = self._loop.time()
                cost = self._cost(request)
                while self._held and self._held + cost > self._limits.window_bytes:
                    self._room.clear()
                    await self._room.wait()
                self._accept(request, time.monotonic(), cost)
        except asyncio.CancelledError:
            raise
        except Exception:  # the call is ending under the reader; the writer sees it end
            log.debug("reading a relax stream ended", exc_info=True)
        finally:
            self._read_done = True
            self._wake.set()

    def _cost(self, request) -> int:
        """Estimated bytes a message holds until its answer is written: its largest answer
        (every trajectory frame it asked for, and the final one)."""
        if isinstance(request, Malformed) or request.cancel:
            return ANSWER_OVERHEAD + len(request.id)
        frames = 1 + _max_frames(request.settings)
        return request.ByteSize() + ANSWER_OVERHEAD + frames * _frame_bytes(request)

    def _release(self, cost: int) -> None:
        self._held -= cost
        self._metrics.stream_held_bytes.dec(cost)
        self._room.set()

    def _accept(self, request, received: float, cost: int) -> None:
        """Start the relaxation ``request`` asks for, or answer it at once."""
        self._held += cost
        self._metrics.stream_held_bytes.inc(cost)
        if isinstance(request, Malformed):
            self._refuse(request.id, InvalidArgumentError(request.message), cost)
            return
        if request.cancel:
            if request.id in self._open:
                self._engine.cancel(self._open[request.id][0])
            self._release(cost)  # a cancel has no answer of its own
            return
        if request.id in self._open:
            error = InvalidArgumentError(f"id: {request.id!r} is in flight")
            self._refuse(request.id, error, cost)
            return
        try:
            relaxation = self._start(request, received, cost)
            self._engine.submit(relaxation)
        except Exception as err:  # a ServeError, or a bug (then INTERNAL)
            if not isinstance(err, ServeError):
                log.exception("starting a relaxation failed")
            self._refuse(request.id, describe(err), cost)
            return
        self._open[request.id] = (relaxation, cost)

        def done(future) -> None:  # the engine's thread
            # A closed loop means the server stopped, and the call with it.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._answer, request.id, received, future.result())

        relaxation.future.add_done_callback(done)

    def _answer(self, request_id: str, received: float, outcome: Outcome) -> None:
        _, cost = self._open.pop(request_id)
        seconds = time.monotonic() - received
        self._queue(encode_outcome(request_id, outcome, seconds), cost)

    def _refuse(self, request_id: str, error: ServeError, cost: int) -> None:
        self._queue(relax_pb2.RelaxResponse(id=request_id, status=_status(error)), cost)

    def _queue(self, answer: relax_pb2.RelaxResponse, cost: int) -> None:
        self._answers.append((answer, cost))
        self._wake.set()

    def _start(self, request: relax_pb2.RelaxRequest, received: float, cost: int) -> Relaxation:
        """Check the structure (as Compute does), its settings, and that its largest
        answer fits in one message."""
        check_names(request)
        served = self._registry.resolve(request.model, request.version)
        compute = inference_pb2.ComputeRequest(
            model=request.model,
            version=request.version,
            head=request.head,
            structure=request.structure,
            allow_extrapolation=request.allow_extrapolation,
        )
        checked = check_request(served, compute, resolve_head(served, compute))
        settings = check_settings(request.settings, checked.num_atoms, checked.structure.pbc)
        if cost > self._max_message_bytes:
            raise InvalidArgumentError(
                f"settings.trajectory_every: up to {_max_frames(request.settings)} frames of "
                f"{checked.num_atoms} atoms would need about {cost / 2**20:.1f} MiB, over the "
                f"server's {self._max_message_bytes / 2**20:.1f} MiB message limit; keep "
                "fewer frames (a larger trajectory_every or fewer max_steps)"
            )
        positions = from_array(request.structure.positions, field="structure.positions")
        deadline = self._deadline
        if request.timeout:
            if not math.isfinite(request.timeout) or request.timeout < 0:
                raise InvalidArgumentError(f"timeout: must be >= 0 seconds, got {request.timeout}")
            own = received + request.timeout
            deadline = own if deadline is None else min(deadline, own)
        return Relaxation(
            template=compute,
            checked=checked,
            served=served,
            settings=settings,
            positions=np.asarray(positions, dtype=np.float64).reshape(-1, 3),
            cell=checked.structure.cell,
            deadline=deadline,
        )


def check_settings(
    message: relax_pb2.RelaxSettings, num_atoms: int, pbc: tuple[bool, bool, bool]
) -> Settings:
    """The settings of one structure, defaults filled in, or INVALID_ARGUMENT naming the
    field."""
    if message.optimizer not in OPTIMIZER_NAMES:
        raise InvalidArgumentError(f"settings.optimizer: unknown value {message.optimizer}")
    fmax = message.fmax or DEFAULT_FMAX
    if not math.isfinite(fmax) or fmax <= 0:
        raise InvalidArgumentError(f"settings.fmax: must be > 0 eV/A, got {message.fmax}")
    max_steps = message.max_steps or DEFAULT_MAX_STEPS
    if not 0 < max_steps <= MAX_STEPS:
        raise InvalidArgumentError(
            f"settings.max_steps: must be in 1..{MAX_STEPS}, got {message.max_steps}"
        )
    if message.relax_cell and not all(pbc):
        raise InvalidArgumentError(
            "settings.relax_cell: needs a structure periodic along all three directions"
        )
    fixed = tuple(int(i) for i in message.fixed_atoms)
    if any(not 0 <= i < num_atoms for i in fixed):
        raise InvalidArgumentError(
            f"settings.fixed_atoms: indices must be in 0..{num_atoms - 1}, got {list(fixed)}"
        )
    if message.trajectory_every < 0:
        raise InvalidArgumentError(
            f"settings.trajectory_every: must be >= 0, got {message.trajectory_every}"
        )
    return Settings(
        optimizer=OPTIMIZER_NAMES[message.optimizer],
        fmax=fmax,
        max_steps=max_steps,
        relax_cell=message.relax_cell,
        fixed=fixed,
        trajectory_every=message.trajectory_every,
    )


def _max_frames(settings: relax_pb2.RelaxSettings) -> int:
    """Trajectory frames an answer may carry (the start, every ``trajectory_every``-th
    step, and the end)."""
    if settings.trajectory_every <= 0:
        return 0
    steps = min(settings.max_steps or DEFAULT_MAX_STEPS, MAX_STEPS)
    return steps // settings.trajectory_every + 2


def _frame_bytes(request: relax_pb2.RelaxRequest) -> int:
    """Bytes of one frame of this structure: float64 positions and forces, the numbers,
    cell and stress, and the frame's own fields."""
    atoms = request.structure.numbers.shape[0] if request.structure.numbers.shape else 0
    return 48 * atoms + request.structure.numbers.ByteSize() + 256


def encode_outcome(request_id: str, outcome: Outcome, seconds: float) -> relax_pb2.RelaxResponse:
    response = relax_pb2.RelaxResponse(
        id=request_id,
        model=outcome.served.name,
        version=outcome.served.version,
        head=outcome.head,
        steps=outcome.steps,
        converged=outcome.converged,
        seconds=seconds,
    )
    if outcome.error is not None:
        response.status.CopyFrom(_status(outcome.error))
    if outcome.extrapolated:
        response.extrapolation = True
        response.extrapolated_elements.extend(outcome.extrapolated)
    if outcome.final is not None:
        response.final.CopyFrom(_frame(outcome.final, outcome))
    response.trajectory.extend(_frame(frame, outcome) for frame in outcome.trajectory)
    return response


def _frame(frame: Frame, outcome: Outcome) -> relax_pb2.RelaxFrame:
    structure = structure_message(outcome.numbers, frame.positions, frame.cell, outcome.pbc)
    message = relax_pb2.RelaxFrame(
        step=frame.step,
        structure=structure,
        energy=frame.energy,
        forces=to_array(frame.forces, dtype="float64"),
        fmax=frame.fmax,
    )
    if frame.stress is not None:
        message.stress.CopyFrom(to_array(frame.stress, dtype="float64"))
    return message


def _status(error: ServeError) -> inference_pb2.Status:
    return inference_pb2.Status(code=status_code(error).value[0], message=clip(error.message))
