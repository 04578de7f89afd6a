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
import logging
import math
import time

import grpc
import numpy as np

from crossfield.v1 import inference_pb2, relax_pb2, relax_pb2_grpc
from crossfield.v1.arrays import from_array, to_array
from crossfield.v1.messages import structure_message

from .admission import check_names, describe
from .errors import InvalidArgumentError, ServeError
from .models import ModelRegistry
from .relax_engine import Frame, Outcome, Relaxation, RelaxEngine, Settings
from .responses import clip, status_code
from .streams import call_deadline
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
_READ_DONE = object()


class RelaxService(relax_pb2_grpc.RelaxationServicer):
    def __init__(self, registry: ModelRegistry, engine: RelaxEngine) -> None:
        self._registry = registry
        self._engine = engine

    async def Relax(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await RelaxStream(self._registry, self._engine, context).run(request_iterator)


class RelaxStream:
    """One open Relax call (lives on the I/O loop)."""

    def __init__(
        self, registry: ModelRegistry, engine: RelaxEngine, context: grpc.aio.ServicerContext
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._context = context
        self._deadline = call_deadline(context)
        self._loop = asyncio.get_running_loop()
        self._answers: asyncio.Queue = asyncio.Queue()
        self._open: dict[str, Relaxation] = {}

    async def run(self, requests) -> None:
        reader = asyncio.create_task(self._read(requests))
        try:
            reading = True
            while reading or self._open or not self._answers.empty():
                answer = await self._answers.get()
                if answer is _READ_DONE:
                    reading = False
                    continue
                await self._context.write(answer)
        finally:
            reader.cancel()
            for relaxation in list(self._open.values()):  # the call ended under them
                self._engine.cancel(relaxation)

    async def _read(self, requests) -> None:
        try:
            async for request in requests:
                self._accept(request, time.monotonic())
        finally:
            self._answers.put_nowait(_READ_DONE)

    def _accept(self, request, received: float) -> None:
        if isinstance(request, Malformed):
            self._refuse(request.id, InvalidArgumentError(request.message))
            return
        if request.cancel:
            relaxation = self._open.get(request.id)
            if relaxation is not None:
                self._engine.cancel(relaxation)
            return
        if request.id in self._open:
            self._refuse(request.id, InvalidArgumentError(f"id: {request.id!r} is in flight"))
            return
        try:
            relaxation = self._start(request, received)
            self._engine.submit(relaxation)
        except Exception as err:  # a ServeError, or a bug (then INTERNAL)
            if not isinstance(err, ServeError):
                log.exception("starting a relaxation failed")
            self._refuse(request.id, describe(err))
            return
        self._open[request.id] = relaxation

        def done(future) -> None:  # the engine's thread
            self._loop.call_soon_threadsafe(self._answer, request.id, received, future.result())

        relaxation.future.add_done_callback(done)

    def _answer(self, request_id: str, received: float, outcome: Outcome) -> None:
        self._open.pop(request_id, None)
        seconds = time.monotonic() - received
        self._answers.put_nowait(encode_outcome(request_id, outcome, seconds))

    def _refuse(self, request_id: str, error: ServeError) -> None:
        self._answers.put_nowait(relax_pb2.RelaxResponse(id=request_id, status=_status(error)))

    def _start(self, request: relax_pb2.RelaxRequest, received: float) -> Relaxation:
        """Check the structure (as Compute does) and its settings."""
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
