"""Exit 0 when a Crossfield server answers SERVING on the standard gRPC health service.

The container's HEALTHCHECK (and, where a probe must speak TLS, a Kubernetes ``exec``
probe) runs this. It imports only ``grpc`` and ``grpc_health`` so that it starts in a
fraction of the time ``crossfield`` (torch) would take, and it keeps working when the
server is too busy to import anything.

Settings come from flags or, for the container, from the environment:
``CROSSFIELD_HEALTH_ADDRESS`` (default ``127.0.0.1:50051``), ``CROSSFIELD_HEALTH_SERVICE``
(default ``crossfield.v1.Inference``; empty checks the server as a whole), and for a
server with TLS ``CROSSFIELD_HEALTH_CA`` (PEM of the CA that signed the server's
certificate), ``CROSSFIELD_HEALTH_CERT`` / ``CROSSFIELD_HEALTH_KEY`` (a client certificate
when the server requires mutual TLS) and ``CROSSFIELD_HEALTH_SERVER_NAME`` (the name in the
server's certificate, since the check dials 127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

INFERENCE_SERVICE = "crossfield.v1.Inference"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=env("CROSSFIELD_HEALTH_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--service", default=env("CROSSFIELD_HEALTH_SERVICE", INFERENCE_SERVICE))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--ca", default=env("CROSSFIELD_HEALTH_CA"), help="CA PEM: use TLS")
    parser.add_argument("--cert", default=env("CROSSFIELD_HEALTH_CERT"), help="client cert PEM")
    parser.add_argument("--key", default=env("CROSSFIELD_HEALTH_KEY"), help="client key PEM")
    parser.add_argument("--server-name", default=env("CROSSFIELD_HEALTH_SERVER_NAME"))
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key: give both (mutual TLS) or neither")
    if args.cert and not args.ca:
        parser.error("--cert: a client certificate needs --ca (TLS) as well")
    return args


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.ca:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.ca),
        private_key=_read(args.key) if args.key else None,
        certificate_chain=_read(args.cert) if args.cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open_channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"unhealthy: {args.address}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.address} service {args.service!r} is {status}", file=sys.stderr)
        return 1
    print(f"healthy: {args.address} service {args.service!r} is {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
