"""Test certificates made at test time (no key ever ships) and a server with security on.

Elliptic-curve keys (P-256) because they are generated in milliseconds; gRPC's TLS accepts
them like RSA keys.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crossfield.model import CrossfieldMACE
from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.batcher import BatchLimits
from crossfield.server.security import SecurityConfig


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM files and bytes."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key) -> Identity:
    folder.mkdir(parents=True, exist_ok=True)
    identity = Identity(folder / f"{stem}.crt", folder / f"{stem}.key")
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return identity


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.identity = _write(folder, name, self._cert, self._key)

    @property
    def pem(self) -> bytes:
        return self.identity.cert_pem

    def issue(self, common_name: str, server: bool) -> Identity:
        """A leaf certificate: for 127.0.0.1/localhost when ``server``, else a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return _write(self.folder, f"{self.name}-{common_name}", cert, key)


@contextmanager
def secure_server(
    model: CrossfieldMACE, security: SecurityConfig, **config
) -> Iterator[InferenceServer]:
    """A real server on 127.0.0.1 serving ``model`` as 'small' version 1 with ``security``."""
    settings = dict(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        device="cpu",
        dtype=torch.float64,
        limits=BatchLimits(max_delay=0.001),
        grace=2.0,
        security=security,
    )
    settings.update(config)
    server = InferenceServer(ServerConfig(**settings))
    server.add_model(model, "small", "1")
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=1.0)
