"""Requests off the wire: decoding that never fails a call, and registering services with it.

gRPC's generated registration decodes with ``Message.FromString``; bytes that do not parse
(a ``string`` field that is not UTF-8, a truncated message) then raise inside gRPC, and the
client gets UNKNOWN or INTERNAL with a Python traceback's words, and our metrics never see
the request. Here a request that does not parse becomes a ``Malformed`` value that the
handler answers INVALID_ARGUMENT, naming the field, and counts like any other refusal.

To name the field, the bytes are parsed a second time with a *lenient twin* of the message:
the same field numbers, with every top-level ``string`` field declared ``bytes`` (the two
are the same on the wire), so that parsing succeeds and each string can be checked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

_LENIENT_POOL = descriptor_pool.DescriptorPool()


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes are not a valid message: what was wrong, and its ``id`` when
    that much could be read (so that a stream can still answer it by id)."""

    message: str
    id: str = ""


def decoder(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer for gRPC that returns ``Malformed`` instead of raising."""
    descriptor = message_class.DESCRIPTOR

    def decode(data: bytes) -> Message | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return _diagnose(descriptor, data, err)

    return decode


def _diagnose(descriptor: Descriptor, data: bytes, error: DecodeError) -> Malformed:
    try:
        twin = _lenient_class(descriptor).FromString(data)
    except DecodeError:
        return Malformed(f"request: not a valid {descriptor.name} message ({error})")
    request_id = ""
    bad = []
    for field in descriptor.fields:
        if field.type != FieldDescriptor.TYPE_STRING:
            continue
        values = getattr(twin, field.name)
        for value in values if field.is_repeated else [values]:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(field.name)
                break
            if field.name == "id":
                request_id = text
    if not bad:
        return Malformed(f"request: not a valid {descriptor.name} message ({error})")
    return Malformed(f"{', '.join(bad)}: not valid UTF-8 (strings must be UTF-8)", request_id)


@functools.cache
def _lenient_class(descriptor: Descriptor) -> type[Message]:
    """The twin of ``descriptor``: its top-level string fields as bytes, nothing else (other
    fields parse as unknown fields and are ignored)."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"crossfield_lenient/{descriptor.full_name}.proto",
        package="crossfield.lenient",
        syntax="proto3",
    )
    twin = file.message_type.add(name=descriptor.name)
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            twin.field.add(
                name=field.name,
                number=field.number,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                if field.is_repeated
                else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            )
    _LENIENT_POOL.Add(file)
    found = _LENIENT_POOL.FindMessageTypeByName(f"crossfield.lenient.{descriptor.name}")
    return message_factory.GetMessageClass(found)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """Register ``servicer``'s methods for ``service`` with lenient request decoding (the
    generated ``add_*Servicer_to_server`` functions decode strictly)."""
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        make = makers[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=decoder(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
