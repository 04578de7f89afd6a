"""Bearer tokens on every RPC, the message-size limit and the per-client concurrency
limit, against a real server on loopback."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hotload_support import wait_for
from security_support import secure_server
from server_support import request_for, scrape, small_model, structures

from crossfield.model import Structure
from crossfield.server.security import SecurityConfig, peer_host
from crossfield.v1 import inference_pb2, inference_pb2_grpc

CLIENT = (("authorization", "Bearer client-secret"),)
ADMIN = (("authorization", "Bearer admin-secret"),)


@pytest.fixture(scope="module")
def model():
    return small_model(seed=3)


def status_of(call, *args, **kwargs) -> grpc.StatusCode | None:
    """The status a unary call ends with (None: OK)."""
    try:
        call(*args, timeout=30, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return None


def stream_status(responses) -> grpc.StatusCode | None:
    """The status a response stream ends with (None: OK)."""
    try:
        list(responses)
    except grpc.RpcError as err:
        return err.code()
    return None


def test_every_rpc_needs_the_client_token(model) -> None:
    security = SecurityConfig(token="client-secret", admin_token="admin-secret")
    water = request_for(structures(1)[0])
    with secure_server(model, security) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        inference = inference_pb2_grpc.InferenceStub(channel)
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        for metadata in [
            (),
            (("authorization", "Bearer client-secreT"),),
            (("authorization", "Bearer client-secret-and-more"),),
            (("authorization", "Basic client-secret"),),
            (("authorization", "client-secret"),),
        ]:
            assert status_of(inference.Compute, water, metadata=metadata) == unauthenticated
            assert (
                status_of(
                    inference.ListModels, inference_pb2.ListModelsRequest(), metadata=metadata
                )
                == unauthenticated
            )
            stream = inference.ComputeStream(iter([water]), timeout=30, metadata=metadata)
            assert stream_status(stream) == unauthenticated
        for metadata in (CLIENT, ADMIN, (("authorization", "bearer  client-secret "),)):
            assert np.isfinite(inference.Compute(water, timeout=30, metadata=metadata).energy)

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        assert stream_status(reflection.ServerReflectionInfo(iter([ask]), timeout=30)) == (
            unauthenticated
        )
        answers = list(reflection.ServerReflectionInfo(iter([ask]), timeout=30, metadata=CLIENT))
        assert answers[0].list_services_response.service

        health = health_pb2_grpc.HealthStub(channel)  # open: probes send no token
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING

        samples = scrape(server)
    key = ("crossfield_rejected_calls_total", frozenset({("status", "UNAUTHENTICATED")}))
    assert samples[key] == 5 * 3 + 1


def test_message_size_limit(model) -> None:
    with secure_server(model, SecurityConfig(), max_message_bytes=64 * 1024) as server:
        inference = inference_pb2_grpc.InferenceStub(
            grpc.insecure_channel(f"127.0.0.1:{server.port}")
        )
        rng = np.random.default_rng(0)
        big = Structure(np.full(3000, 1), rng.uniform(0, 200, size=(3000, 3)))
        assert request_for(big).ByteSize() > 64 * 1024
        assert status_of(inference.Compute, request_for(big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status_of(inference.Compute, request_for(structures(1)[0])) is None


def test_per_client_concurrency_limit(model) -> None:
    water = request_for(structures(1)[0], id="w")
    with secure_server(model, SecurityConfig(max_calls_per_client=2)) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        inference = inference_pb2_grpc.InferenceStub(channel)

        def open_stream() -> OpenStream | None:
            """A stream that holds its slot (it has answered) until closed; None when the
            server refused it."""
            stream = OpenStream(inference, water)
            return stream if stream.code is None else None

        first, second = open_stream(), open_stream()
        assert first and second
        assert status_of(inference.Compute, water) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert open_stream() is None

        first.close()  # a stream that ends gives its slot back
        assert status_of(inference.Compute, water) is None
        second.call.cancel()  # so does a cancelled one, when the server sees it end
        second.reader.join(timeout=30)
        third = open_stream()
        fourth = wait_for(open_stream, "the cancelled stream's slot", timeout=10)
        assert third and fourth
        assert status_of(inference.Compute, water) == grpc.StatusCode.RESOURCE_EXHAUSTED
        third.close()
        fourth.close()
        for _ in range(10):  # sequential calls never trip the limit once all are released
            assert status_of(inference.Compute, water) is None
        samples = scrape(server)
    key = ("crossfield_rejected_calls_total", frozenset({("status", "RESOURCE_EXHAUSTED")}))
    assert samples[key] >= 3


class OpenStream:
    """A ComputeStream kept open by a blocking request iterator, read by a thread."""

    def __init__(self, inference, request) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.call = inference.ComputeStream(iter(self._requests.get, None), timeout=60)
        self.code: grpc.StatusCode | None = None
        answered = threading.Event()

        def read() -> None:
            try:
                for _ in self.call:
                    answered.set()
            except grpc.RpcError as err:
                self.code = err.code()
            answered.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        self._requests.put(request)
        assert answered.wait(30), "the stream neither answered nor failed"

    def close(self) -> None:
        self._requests.put(None)
        self.reader.join(timeout=30)
        assert self.code is None, self.code


def test_peer_host_drops_the_port() -> None:
    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:5") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
