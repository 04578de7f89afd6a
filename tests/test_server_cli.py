"""``crossfield serve`` as a separate process: checkpoints, the default model, health,
reflection, and a graceful SIGTERM that finishes queued work before exiting."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase.build import molecule
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_support import request_for, small_model

from crossfield.model import Structure, evaluate, save_checkpoint
from crossfield.v1 import inference_pb2, inference_pb2_grpc


@contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """Start ``crossfield serve ARGS`` on loopback; yields the process and its gRPC port
    (the line that announced it: ``process.listening``)."""
    command = [
        sys.executable,
        "-m",
        "crossfield.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"listening on port (\d+)", line)
            if match:
                process.listening = line
                break
        else:
            pytest.fail("server exited before listening:\n" + "".join(lines))
        yield process, int(match.group(1))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_serve_checkpoint_with_health_reflection_and_graceful_sigterm(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "small.pt"
    save_checkpoint(model, path, metadata={"version": "7"})
    water = Structure.from_atoms(molecule("H2O"), head="r2scan")
    with serve(
        "--checkpoint", str(path), "--name", "small", "--dtype", "float64", "--max-delay-ms", "1500"
    ) as (process, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "crossfield.v1.Inference"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        services = {s.name for s in answer.list_services_response.service}
        assert {"crossfield.v1.Inference", "grpc.health.v1.Health"} <= services
        inference = inference_pb2_grpc.InferenceStub(channel)
        info = inference.GetModel(inference_pb2.GetModelRequest(name="small"), timeout=10)
        assert (info.version, info.dtype, list(info.elements)) == (
            "7",
            "float64",
            model.config.elements,
        )

        queued = [
            inference.Compute.future(request_for(water, id=str(i)), timeout=30) for i in range(4)
        ]
        time.sleep(0.5)  # the four wait in the queue for the 1.5 s delay
        process.send_signal(signal.SIGTERM)
        reference = evaluate(model, [water])[0]["energy"]
        for call in queued:
            np.testing.assert_allclose(call.result().energy, reference, rtol=1e-10)
        assert process.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError) as raised:
            inference.Compute(request_for(water), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        output = process.stdout.read()
        assert "stopped" in output


def test_serve_without_arguments_serves_the_labelled_default_model() -> None:
    with serve() as (process, port):
        inference = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        models = inference.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert models.default_model == "default"
        (info,) = models.models
        assert info.metadata["trained"] is True
        assert [h.name for h in info.heads] == ["gfn2_xtb", "gfn1_xtb", "emt"]
        assert info.dtype == "float32"
        request = request_for(Structure.from_atoms(molecule("CH3CH2OH")), model="")
        response = inference.Compute(request, timeout=60)
        assert response.model == "default" and response.head == info.default_head
        assert np.isfinite(response.energy)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def children_of(pid: int) -> dict[int, str]:
    """The command lines of the processes whose parent is ``pid``, by pid (Linux /proc)."""
    commands = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == pid:
            commands[int(entry.name)] = command
    return commands


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_serve_on_a_cpu_evaluates_an_eager_model_in_a_model_process_unless_told_not_to(
    tmp_path: Path,
) -> None:
    """The automatic choice: on a CPU an eager model runs in a child process of its own
    (``--model-process``'s default), answering what the model gives in-process;
    ``--no-model-process`` keeps it in the server's process."""
    model = small_model()
    path = tmp_path / "small.pt"
    save_checkpoint(model, path)
    water = Structure.from_atoms(molecule("H2O"))
    expected = evaluate(model, [water])[0]["energy"]
    found = {}
    for option in ([], ["--no-model-process"]):
        arguments = ["--checkpoint", str(path), "--name", "small", "--dtype", "float64"]
        with serve(*arguments, "--device", "cpu", *option) as (process, port):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            inference = inference_pb2_grpc.InferenceStub(channel)
            response = inference.Compute(request_for(water), timeout=60)
            np.testing.assert_allclose(response.energy, expected, rtol=1e-10)
            children = children_of(process.pid)
            child = "crossfield.server.model_process"
            label = " ".join(option) or "default"
            found[label] = any(child in command for command in children.values())
            # the server says so, naming the child
            said = re.search(r"models evaluate in a model process, pid (\d+)", process.listening)
            assert (said is not None) == found[label], process.listening
            assert said is None or child in children[int(said.group(1))]
            channel.close()
    assert found == {"default": True, "--no-model-process": False}
