"""Our types -> wire messages: results, errors, model descriptions, status messages.

Status messages travel in HTTP/2 trailers, which clients cap (8-16 KiB by default): a longer
one turns into RESOURCE_EXHAUSTED on the client, whatever the server meant. So every
message leaves here clipped (``clip``); names a request can make arbitrarily long are kept
out of messages before that (``admission.check_names``).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import struct_pb2

from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import to_array

from .errors import PoisonError, ServeError
from .models import ModelRegistry, ServedModel
from .work import StructureResult, WorkItem

MAX_STATUS_MESSAGE = 1024  # characters of a status message; far below any client's cap


def clip(message: str) -> str:
    """``message`` cut to ``MAX_STATUS_MESSAGE`` characters, saying how long it was."""
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return message[: MAX_STATUS_MESSAGE - 40] + f"... ({len(message)} characters, clipped)"


def status_code(error: ServeError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def error_response(request_id: str, error: ServeError) -> inference_pb2.ComputeResponse:
    """A stream's answer to one structure that failed: its id and status, with the poison
    reason where a unary call would carry it in its trailing metadata."""
    status = inference_pb2.Status(code=status_code(error).value[0], message=clip(error.message))
    if isinstance(error, PoisonError):
        status.poison = clip(error.reason)
    return inference_pb2.ComputeResponse(id=request_id, status=status)


def encode_result(
    request_id: str, served: ServedModel, item: WorkItem, result: StructureResult
) -> inference_pb2.ComputeResponse:
    fields: dict[str, Any] = {
        "id": request_id,
        "model": served.name,
        "version": served.version,
        "head": item.request.structure.head,
        "queue_seconds": result.queue_seconds,
        "compute_seconds": result.compute_seconds,
    }
    if item.request.extrapolated_elements:
        fields["extrapolation"] = True
        fields["extrapolated_elements"] = item.request.extrapolated_elements
    if result.energy is not None:
        fields["energy"] = result.energy
    for name in ("forces", "stress", "atom_energies"):
        value = getattr(result, name)
        if value is not None:
            fields[name] = to_array(value)
    return inference_pb2.ComputeResponse(**fields)


def model_info(served: ServedModel, registry: ModelRegistry) -> inference_pb2.ModelInfo:
    """What a client needs to know about one loaded version."""
    versions, latest = registry.versions(served.name)
    config = served.model.config
    heads = [
        inference_pb2.HeadInfo(
            name=h.name,
            level_of_theory=_struct(h.level_of_theory),
            coverage_known=h.elements is not None,
            elements=h.elements or [],
            systems=h.systems or [],
        )
        for h in config.heads
    ]
    return inference_pb2.ModelInfo(
        name=served.name,
        version=served.version,
        latest=served.version == latest,
        versions=versions,
        heads=heads,
        default_head=config.head_names[0],
        elements=config.elements,
        cutoff=config.r_max,
        dtype=served.dtype,
        backend=served.backend,
        device=served.device,
        max_atoms_per_structure=served.max_atoms_per_structure,
        metadata=_struct(served.metadata),
    )


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """JSON-able view of free-form metadata (numbers, strings, lists, nested dicts)."""
    message = struct_pb2.Struct()
    message.update(json.loads(json.dumps(data, default=str)))
    return message
