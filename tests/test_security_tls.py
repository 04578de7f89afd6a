"""TLS and mutual TLS with certificates made at test time: trusted clients are served,
plaintext and untrusted clients are refused before any RPC runs."""

from __future__ import annotations

import grpc
import pytest
from security_support import CertificateAuthority, secure_server
from server_support import request_for, small_model, structures

from crossfield.server.security import SecurityConfig
from crossfield.v1 import inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def model():
    return small_model(seed=3)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "crossfield-test-ca")
    other = CertificateAuthority(folder, "stranger-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("intruder", server=False),
        "stranger_ca": other,
    }


def works(channel: grpc.Channel) -> bool:
    """Whether a call gets through; a refused TLS handshake reads as UNAVAILABLE."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return False
    return True


def test_tls_serves_trusting_clients_and_refuses_plaintext(model, pki) -> None:
    server_identity = pki["server"]
    security = SecurityConfig(tls_cert=server_identity.cert, tls_key=server_identity.key)
    with secure_server(model, security) as server:
        address = f"127.0.0.1:{server.port}"
        trusted = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=pki["ca"].pem)
        )
        assert works(trusted)
        water = structures(1)[0]
        response = inference_pb2_grpc.InferenceStub(trusted).Compute(request_for(water), timeout=30)
        assert response.version == "1"
        assert not works(grpc.insecure_channel(address))
        distrusting = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=pki["stranger_ca"].pem)
        )
        assert not works(distrusting)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(model, pki) -> None:
    server_identity = pki["server"]
    security = SecurityConfig(
        tls_cert=server_identity.cert,
        tls_key=server_identity.key,
        tls_client_ca=pki["ca"].identity.cert,
    )
    with secure_server(model, security) as server:
        address = f"127.0.0.1:{server.port}"

        def channel(identity=None) -> grpc.Channel:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pki["ca"].pem,
                private_key=identity.key_pem if identity else None,
                certificate_chain=identity.cert_pem if identity else None,
            )
            return grpc.secure_channel(address, credentials)

        assert works(channel(pki["client"]))
        assert not works(channel())
        assert not works(channel(pki["stranger"]))
        assert not works(grpc.insecure_channel(address))


def test_security_config_refuses_half_configurations(pki, tmp_path) -> None:
    server_identity = pki["server"]
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        SecurityConfig(tls_cert=server_identity.cert)
    with pytest.raises(ValueError, match="tls_client_ca: mutual TLS needs"):
        SecurityConfig(tls_client_ca=pki["ca"].identity.cert)
    with pytest.raises(ValueError, match="admin_token: must differ"):
        SecurityConfig(token="same", admin_token="same")
    with pytest.raises(ValueError, match="tls_key: cannot read"):
        missing = tmp_path / "missing.key"
        SecurityConfig(tls_cert=server_identity.cert, tls_key=missing).credentials()
    config = SecurityConfig(token="client-secret-value", admin_token="admin-secret-value")
    assert "secret-value" not in repr(config) + config.describe()


def test_crossfield_client_speaks_mutual_tls_with_a_token(model, pki) -> None:
    """The library client end to end: CA, client certificate and bearer token."""
    from crossfield.client import Client, RemoteCalculator, ServerUnavailableError

    server_identity = pki["server"]
    security = SecurityConfig(
        tls_cert=server_identity.cert,
        tls_key=server_identity.key,
        tls_client_ca=pki["ca"].identity.cert,
        token="client-secret",
    )
    with secure_server(model, security) as server:
        address = f"127.0.0.1:{server.port}"
        identity = pki["client"]
        client = Client(
            address,
            root_certificates=pki["ca"].pem,
            client_certificate=identity.cert_pem,
            client_key=identity.key_pem,
            token="client-secret",
            retries=1,
        )
        from ase import Atoms

        first = structures(1)[0]
        water = Atoms(numbers=first.numbers, positions=first.positions)
        assert client.compute(water).energy is not None
        water.calc = RemoteCalculator(client, model="", head=None)
        assert water.get_forces().shape == (len(water), 3)
        # A server that drops the handshake looks like one that is not up yet: the client
        # waits for it until its deadline (wait for ready), then says it is unreachable.
        without_certificate = Client(
            address, root_certificates=pki["ca"].pem, token="client-secret", timeout=1.0
        )
        with pytest.raises(ServerUnavailableError):
            without_certificate.compute(water)
        assert "client-secret" not in repr(client.security)
