"""deploy/healthcheck.py, the container's HEALTHCHECK and the TLS overlay's probe, run as a
separate process against real servers: healthy only when the server says SERVING, through
plaintext and mutual TLS, with a client token required for inference (health is open)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from security_support import CertificateAuthority, secure_server
from server_support import small_model

from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.security import SecurityConfig

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "healthcheck.py"


def healthcheck(address: str, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """The script as Docker or an exec probe runs it: settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSFIELD_HEALTH_")}
    env.update(CROSSFIELD_HEALTH_ADDRESS=address, **environment)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_plaintext_server_with_a_token_is_healthy(model) -> None:
    with secure_server(model, SecurityConfig(token="client-secret")) as server:
        result = healthcheck(f"127.0.0.1:{server.port}")
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
        whole = healthcheck(f"127.0.0.1:{server.port}", "--service=")
        assert whole.returncode == 0, whole.stderr
        unknown = healthcheck(f"127.0.0.1:{server.port}", "--service=crossfield.v1.Nothing")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_server_without_a_loaded_model_is_unhealthy() -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=None, device="cpu", dtype=torch.float64
    )
    server = InferenceServer(config).start()
    try:
        result = healthcheck(f"127.0.0.1:{server.port}")
    finally:
        server.stop(grace=0.5)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_nothing_listening_is_unhealthy_within_the_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = healthcheck(f"127.0.0.1:{port}", "--timeout=2")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr


def test_mutual_tls_server_is_healthy_only_with_a_client_certificate(model, tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path, "ca")
    server_identity = authority.issue("server", server=True)
    probe_identity = authority.issue("probe", server=False)
    security = SecurityConfig(
        tls_cert=server_identity.cert,
        tls_key=server_identity.key,
        tls_client_ca=authority.identity.cert,
        token="client-secret",
    )
    with secure_server(model, security) as server:
        address = f"127.0.0.1:{server.port}"
        tls = {
            "CROSSFIELD_HEALTH_CA": str(authority.identity.cert),
            "CROSSFIELD_HEALTH_SERVER_NAME": "localhost",
        }
        with_certificate = healthcheck(
            address,
            **tls,
            CROSSFIELD_HEALTH_CERT=str(probe_identity.cert),
            CROSSFIELD_HEALTH_KEY=str(probe_identity.key),
        )
        assert with_certificate.returncode == 0, with_certificate.stderr
        without_certificate = healthcheck(address, "--timeout=2", **tls)
        assert without_certificate.returncode == 1
        plaintext = healthcheck(address, "--timeout=2")
        assert plaintext.returncode == 1


def test_half_a_client_identity_is_refused_before_dialling() -> None:
    result = healthcheck("127.0.0.1:1", "--ca=ca.crt", "--cert=probe.crt")
    assert result.returncode == 2
    assert "--cert and --key" in result.stderr
