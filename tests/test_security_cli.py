"""``crossfield serve --repo`` as its own process with TLS and tokens from the environment:
it follows the repository, refuses plaintext and missing tokens, and never prints a token."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from hotload_support import SERVING, health, wait_for
from security_support import CertificateAuthority
from server_support import request_for, small_model, structures

from crossfield.model import evaluate, repository
from crossfield.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

TOKEN = "tok-3f9a1c77e2"
ADMIN_TOKEN = "adm-81d0b5c4aa"


def test_serve_repo_over_tls_with_tokens_from_the_environment(tmp_path) -> None:
    repo = tmp_path / "repo"
    ca = CertificateAuthority(tmp_path / "pki", "ca")
    identity = ca.issue("server", server=True)
    models = {1: small_model(seed=21), 2: small_model(seed=22)}
    repository.publish(models[1], repo, "small")
    command = [sys.executable, "-m", "crossfield.cli", "serve", "--repo", str(repo)]
    command += ["--poll-interval", "0.2", "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "-1", "--dtype", "float64", "--max-delay-ms", "1"]
    command += ["--tls-cert", str(identity.cert), "--tls-key", str(identity.key)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CROSSFIELD_TOKEN": TOKEN,
        "CROSSFIELD_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if match := re.search(r"listening on port (\d+)", line):
                break
        else:
            pytest.fail("server exited before listening:\n" + "".join(lines))
        address = f"127.0.0.1:{match.group(1)}"
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.pem))
        wait_for(lambda: health(channel) == SERVING, "the first version to warm up")

        inference = inference_pb2_grpc.InferenceStub(channel)
        water = structures(1, seed=9)[0]
        token = (("authorization", f"Bearer {TOKEN}"),)
        with pytest.raises(grpc.RpcError) as raised:
            inference.Compute(request_for(water), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        plaintext = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as raised:
            plaintext.Compute(request_for(water), timeout=10, metadata=token)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        repository.publish(models[2], repo, "small")

        def version() -> str:
            info = inference.GetModel(inference_pb2.GetModelRequest(), timeout=30, metadata=token)
            return info.version

        wait_for(lambda: version() == "2", "the poll to switch to version 2")
        response = inference.Compute(request_for(water), timeout=30, metadata=token)
        assert response.version == "2"
        assert response.energy == pytest.approx(evaluate(models[2], [water])[0]["energy"])

        admin = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), metadata=token)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin_token = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), metadata=admin_token)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        output = "".join(lines) + process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    assert "stopped" in output and "TLS" in output
    assert TOKEN not in output and ADMIN_TOKEN not in output
