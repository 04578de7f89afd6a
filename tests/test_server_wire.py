"""What a hostile byte stream gets, and what the metrics then say, against a real server on
loopback: strings that are not UTF-8 are INVALID_ARGUMENT naming the field (not INTERNAL or
UNKNOWN), attacker-length names never reach a status message (whose size the client caps),
every status is counted once as the client saw it, and request and latency metrics carry
the model version that answered."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from ase.build import molecule
from server_support import request_for, running_server, scrape, small_model

from crossfield.model import Structure
from crossfield.server.responses import MAX_STATUS_MESSAGE
from crossfield.v1 import inference_pb2, inference_pb2_grpc

UNKNOWN = frozenset({("model", "-"), ("version", "-"), ("head", "-")})


@pytest.fixture(scope="module")
def model():
    return small_model(seed=11)


def water(**fields) -> inference_pb2.ComputeRequest:
    request = request_for(Structure.from_atoms(molecule("H2O"), head="pbe"))
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def with_bad_utf8(request: inference_pb2.ComputeRequest, field: str) -> bytes:
    """``request`` serialised with its ``field`` string replaced by bytes that are not
    UTF-8 (protobuf refuses to build such a message, but a hostile client sends bytes)."""
    marker = "\u00a7" * 3  # 6 bytes, a unique pattern to overwrite
    setattr(request, field, marker)
    data = request.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa")


def raw_methods(channel: grpc.Channel):
    """Compute and ComputeStream taking and returning raw bytes."""
    unary = channel.unary_unary(
        "/crossfield.v1.Inference/Compute",
        request_serializer=lambda data: data,
        response_deserializer=inference_pb2.ComputeResponse.FromString,
    )
    stream = channel.stream_stream(
        "/crossfield.v1.Inference/ComputeStream",
        request_serializer=lambda data: data,
        response_deserializer=inference_pb2.ComputeResponse.FromString,
    )
    return unary, stream


def counts(metrics) -> Counter:
    """crossfield_requests_total by (labels without status, status)."""
    found: Counter = Counter()
    for (name, labels), value in metrics.items():
        if name == "crossfield_requests_total":
            labels = dict(labels)
            status = labels.pop("status")
            found[(frozenset(labels.items()), status)] += value
    return found


def test_strings_that_are_not_utf8_are_invalid_argument_naming_the_field(model) -> None:
    with running_server({"small": model}) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        compute, compute_stream = raw_methods(channel)
        for field in ("model", "head", "id"):
            with pytest.raises(grpc.RpcError) as raised:
                compute(with_bad_utf8(water(), field), timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith(f"{field}: not valid UTF-8")
        stream = [
            with_bad_utf8(water(id="a"), "head"),
            water(id="b").SerializeToString(),
            with_bad_utf8(water(id="c"), "version"),
        ]
        answers = {r.id: r for r in compute_stream(iter(stream), timeout=30)}
        get_model = channel.unary_unary(
            "/crossfield.v1.Inference/GetModel",
            request_serializer=lambda data: data,
            response_deserializer=inference_pb2.ModelInfo.FromString,
        )
        bad_name = with_bad_utf8(inference_pb2.GetModelRequest(), "name")
        with pytest.raises(grpc.RpcError) as raised:
            get_model(bad_name, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        metrics = scrape(server)
    assert set(answers) == {"a", "b", "c"}  # a stream answers them by id and goes on
    assert answers["b"].status.code == 0 and answers["b"].HasField("energy")
    for key, field in (("a", "head"), ("c", "version")):
        status = answers[key].status
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert status.message.startswith(f"{field}: not valid UTF-8")
    found = counts(metrics)
    assert found[(UNKNOWN, "INVALID_ARGUMENT")] == 5
    assert sum(found.values()) == 6


def test_attacker_length_names_never_reach_a_status_message(model) -> None:
    huge = "x" * 1_000_000
    with running_server({"small": model}, settings={"max_message_bytes": 4 << 20}) as server:
        inference = inference_pb2_grpc.InferenceStub(
            grpc.insecure_channel(f"127.0.0.1:{server.port}")
        )
        for field in ("model", "head", "version"):
            with pytest.raises(grpc.RpcError) as raised:
                inference.Compute(water(**{field: huge}), timeout=30)
            # RESOURCE_EXHAUSTED here would mean the trailers outgrew what clients accept
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith(f"{field}: 1000000 characters")
            assert len(raised.value.details()) <= MAX_STATUS_MESSAGE
        answers = list(
            inference.ComputeStream(iter([water(id="n", head=huge), water(id="ok")]), timeout=30)
        )
        long_head = "h" * 200  # short enough to be a name: echoed, and still not found
        with pytest.raises(grpc.RpcError) as raised:
            inference.Compute(water(head=long_head), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert long_head in raised.value.details()
        metrics = scrape(server)
    by_id = {r.id: r for r in answers}
    assert by_id["ok"].status.code == 0
    assert by_id["n"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(by_id["n"].status.message) <= MAX_STATUS_MESSAGE
    found = counts(metrics)
    small = frozenset({("model", "small"), ("version", "1")})
    assert found[(UNKNOWN, "INVALID_ARGUMENT")] == 4  # exactly what the client saw
    assert found[(small | {("head", "pbe")}, "OK")] == 1
    assert found[(small | {("head", "-")}, "NOT_FOUND")] == 1
    assert sum(found.values()) == 6


def test_request_and_latency_metrics_carry_the_version(model) -> None:
    canary = small_model(seed=12)
    with running_server({"small": model}) as server:
        server.add_model(canary, "small", "2")
        inference = inference_pb2_grpc.InferenceStub(
            grpc.insecure_channel(f"127.0.0.1:{server.port}")
        )
        for _ in range(3):
            assert inference.Compute(water(version="1"), timeout=30).version == "1"
        for _ in range(2):
            assert inference.Compute(water(), timeout=30).version == "2"  # the newest
        metrics = scrape(server)
    for version, expected in (("1", 3), ("2", 2)):
        labels = frozenset({("model", "small"), ("version", version)})
        requests = ("crossfield_requests_total", labels | {("head", "pbe"), ("status", "OK")})
        assert metrics[requests] == expected
        for histogram in ("request", "queue"):
            assert metrics[(f"crossfield_{histogram}_seconds_count", labels)] == expected
        assert metrics[("crossfield_compute_seconds_count", labels)] >= 1
        assert metrics[("crossfield_queue_depth", labels)] == 0
