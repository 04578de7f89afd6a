"""MD sessions (``ComputeSession``): the structure once, then only positions, on one server.

An MD driver evaluates one structure over and over with its atoms moved a little. A
session keeps what does not change (atoms, periodicity, head, the checks that depend on
them) and the structure's neighbour list between steps, so a step costs the server the
checks its new positions need and a masked neighbour list instead of a new one.

- **Verlet list** (``verlet.VerletList``): kept between steps and rebuilt only when an
  atom has moved more than half the skin or the cell changed; each step gets exactly the
  edges a new neighbour list would give, on its own canonical frame, so its answer is
  Compute's answer.
- **The same road as every request.** A step is checked (``validation.check_configuration``:
  coordinates, canonical frame, graph cost) on the I/O loop, queued at its model's batcher
  (sessions batch with each other and with everyone else) and its graph is built in the
  runner's thread (``GraphBuilder.build``, with a rebuild's pairs found in-process or in
  a worker by the same bounds). A refused step is answered with its status; the session
  goes on from its last structure. The one shortcut: a session alone on the server with
  an idle device runs its step on the loop's thread, saving two thread hand-offs
  (``inline.py``).
- **One step at a time.** The next message is read once the last one is answered (MD is
  sequential), so a session holds one structure and its graph, and its list is touched
  by one thread at a time.
- **Lifetime.** The session is this server's, for the life of the call. A step whose
  version was replaced goes to the new version after the full checks of a start. When
  the server stops, a session ends UNAVAILABLE between steps (its current step answered
  first) with a message that says to resume elsewhere from the last structure; so does one
  idle for ``StreamLimits.idle_timeout``, or whose client stops reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import grpc
import numpy as np

from crossfield.v1 import inference_pb2

from .admission import RESOLVE_ATTEMPTS, Target, check_names, describe, record
from .errors import InvalidArgumentError, ServeError, UnavailableError
from .inline import OpenCalls
from .metrics import Metrics
from .models import ModelRegistry, ServedModel
from .responses import encode_result, error_response
from .streams import (
    StreamLimits,
    abort_unavailable,
    call_deadline,
    deadline_passed,
    write_response,
)
from .validation import (
    check_cell,
    check_configuration,
    check_positions,
    check_properties,
    check_request,
    resolve_head,
)
from .verlet import SKIN, VerletList
from .wire import Malformed
from .work import CheckedRequest, WorkItem

log = logging.getLogger(__name__)

MESSAGES = {
    "idle": "session idle: no step for {timeout} (the server's --stream-idle-timeout); "
    "open a new session when there is work",
    "unread": "session not read: an answer waited {timeout} for the client to take it "
    "(the server's --stream-idle-timeout)",
    "stopping": "server stopping: resume the session on another server from its last "
    "structure (send it as the start of a new session)",
}


@dataclass
class _Structure:
    """What a session's start fixed, checked once and reused by every step."""

    start: inference_pb2.ComputeRequest  # checked again in full when a new version answers
    served: ServedModel
    checked: CheckedRequest  # numbers, pbc, head, properties, extrapolated elements
    cell: np.ndarray | None  # the cell of the last configuration answered


class MdSession:
    """One open ComputeSession call (lives on the I/O loop)."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        limits: StreamLimits,
        context: grpc.aio.ServicerContext,
        calls: OpenCalls,
        skin: float = SKIN,
    ) -> None:
        self._registry = registry
        self._calls = calls
        self._metrics = metrics
        self._limits = limits
        self._context = context
        self._deadline = call_deadline(context)
        self._verlet = VerletList(skin, metrics.session_graphs)
        self._structure: _Structure | None = None
        self._stopped = asyncio.get_running_loop().create_future()

    def stop(self) -> None:
        """The server stops: answer the step in progress, then end (call on the loop)."""
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def run(self, requests: AsyncIterator) -> None:
        """Serve the session to its end; ends the call with a status unless it completed."""
        self._metrics.open_streams.inc()
        reason = "cancelled"
        try:
            reason = await self._serve(requests.__aiter__())
        except asyncio.CancelledError:
            reason = "deadline" if deadline_passed(self._context) else "cancelled"
            raise
        finally:
            self._metrics.streams_ended.labels(reason).inc()
            self._metrics.open_streams.dec()
        if reason in MESSAGES:
            await abort_unavailable(self._context, MESSAGES[reason], self._limits)

    async def _serve(self, requests: AsyncIterator) -> str:
        """Answer messages one at a time; returns why the session ends."""
        while True:
            message = await self._next(requests)
            if isinstance(message, str):
                return message
            received, target = time.monotonic(), Target()
            response, status = await self._answer(message, target)
            written = await write_response(self._context, response, self._limits)
            if written == "cancelled":
                status = "CANCELLED"  # never delivered
            record(self._metrics, target, status, received)
            if written != "written":
                return written

    async def _next(self, requests: AsyncIterator):
        """The next message, or why there is none: completed, idle or stopping."""
        if self._stopped.done():
            return "stopping"
        read = asyncio.ensure_future(requests.__anext__())
        read.add_done_callback(_retrieve)  # a read left behind may end in an exception
        timeout = self._limits.idle_timeout or None
        try:
            done, _ = await asyncio.wait(
                (read, self._stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not read.done():
                read.cancel()
        if read not in done:
            return "stopping" if self._stopped.done() else "idle"
        try:
            return read.result()
        except StopAsyncIteration:
            return "completed"

    async def _answer(self, message, target: Target) -> tuple[inference_pb2.ComputeResponse, str]:
        """Evaluate one message: its response and the status it is counted with."""
        request_id = _message_id(message)
        item = None
        try:
            item = self._admit(message, target)
            future = item.future  # done already if the step ran on this thread
            result = future.result() if future.done() else await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the call ended under the step
            if item is not None:
                target.served.batcher.withdraw(item)
            status = "DEADLINE_EXCEEDED" if deadline_passed(self._context) else "CANCELLED"
            record(self._metrics, target, status, time.monotonic())
            raise
        except Exception as err:  # ServeError, or a bug: either way this message's answer
            if not isinstance(err, ServeError):
                log.exception("a session step failed")
            error = describe(err)
            return error_response(request_id, error), error.code
        if self._structure is not None:  # a refused step's cell is not the session's
            self._structure.cell = item.request.structure.cell
        return encode_result(request_id, target.served, item, result), "OK"

    def _admit(self, message, target: Target) -> WorkItem:
        """Check one message and queue its work at its model version."""
        if isinstance(message, Malformed):
            raise InvalidArgumentError(message.message)
        kind = message.WhichOneof("kind")
        if kind == "start":
            check_names(message.start)
            return self._queue(message.start, target, lambda s: self._start(message.start, s))
        if kind == "step":
            structure = self._structure
            if structure is None:
                raise InvalidArgumentError(
                    "step: the session has no structure yet; its first message must be start"
                )
            return self._queue(structure.start, target, lambda s: self._step(message.step, s))
        raise InvalidArgumentError("request: set start (a structure) or step (new positions)")

    def _queue(self, names: inference_pb2.ComputeRequest, target: Target, check) -> WorkItem:
        """Resolve the model version ``names`` asks for, ``check`` the message for it and
        submit it there; a version retired meanwhile sends it to the one that replaced it
        (as ``Admission.admit`` does)."""
        for _ in range(RESOLVE_ATTEMPTS):
            served = self._registry.resolve(names.model, names.version)
            target.model, target.version, target.served = served.name, served.version, served
            checked, positions = check(served)
            target.head = checked.structure.head
            item = WorkItem(checked, deadline=self._deadline)
            # self._verlet after ``check``: a start has just replaced it
            item.graph_source = partial(self._verlet.graph, request=checked, positions=positions)
            try:
                served.batcher.submit(item, lone=self._calls.lone)
            except UnavailableError:
                if self._registry.is_serving(served):
                    raise  # the server itself is stopping
                continue
            return item
        raise UnavailableError(
            f"model {target.model!r}: versions changed {RESOLVE_ATTEMPTS} times while "
            "admitting this message; retry"
        )

    def _start(
        self, request: inference_pb2.ComputeRequest, served: ServedModel
    ) -> tuple[CheckedRequest, np.ndarray]:
        """Check a start in full; it becomes the session's structure, with a new list."""
        checked = check_request(served, request, resolve_head(served, request))
        limit = served.batcher.limits.graphs.max_coordinate
        positions = check_positions(request.structure, checked.num_atoms, limit)
        self._structure = _Structure(request, served, checked, checked.structure.cell)
        self._verlet = VerletList(self._verlet.skin, self._metrics.session_graphs)
        return checked, positions

    def _step(
        self, step: inference_pb2.SessionStep, served: ServedModel
    ) -> tuple[CheckedRequest, np.ndarray]:
        """Check a step's positions, cell and properties against the session's structure
        (in full, as a start, when another version answers it now)."""
        structure = self._structure
        if served is not structure.served:
            request = inference_pb2.ComputeRequest()
            request.CopyFrom(structure.start)
            request.structure.positions.CopyFrom(step.positions)
            if step.HasField("cell"):
                request.structure.cell.CopyFrom(step.cell)
            structure.checked = check_request(served, request, resolve_head(served, request))
            structure.start, structure.served = request, served
        base = structure.checked
        pbc = base.structure.pbc
        limit = served.batcher.limits.graphs.max_coordinate
        positions = check_positions(step, base.num_atoms, limit, prefix="step")
        cell = check_cell(step, pbc, prefix="step") if step.HasField("cell") else structure.cell
        properties = check_properties(step) if len(step.properties) else base.properties
        numbers, head = base.structure.numbers, base.structure.head
        extrapolated = base.extrapolated_elements
        checked = check_configuration(
            served, numbers, positions, cell, pbc, head, properties, extrapolated
        )
        return checked, positions


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _message_id(message) -> str:
    """The id to echo: the start's or the step's (a malformed message's, if it had one)."""
    if isinstance(message, Malformed):
        return message.id
    kind = message.WhichOneof("kind")
    return getattr(message, kind).id if kind else ""
