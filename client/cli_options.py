"""The flags that say which server answers and how to reach it, shared by the client
commands (``crossfield compute``, ``crossfield ipi``), so that both spell them alike."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_SERVER = "localhost:50051"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        "-s",
        action="append",
        default=None,
        help=f"server address host:port; repeat or comma-separate for several "
        f"(round-robin); default {DEFAULT_SERVER}",
    )
    parser.add_argument("--model", "-m", default="", help="model name (default: the server's)")
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument("--head", default="", help="head / level of theory (default: the model's)")
    parser.add_argument(
        "--allow-extrapolation",
        action="store_true",
        help="answer (flagged) for elements a head was not trained on, instead of refusing",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token (default: $CROSSFIELD_TOKEN; prefer the variable over the flag)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    parser.add_argument(
        "--root-certificates", type=Path, default=None, help="PEM file of trusted roots (TLS)"
    )
    parser.add_argument(
        "--client-certificate",
        type=Path,
        default=None,
        help="PEM certificate of this client, for servers that demand mutual TLS",
    )
    parser.add_argument(
        "--client-key", type=Path, default=None, help="PEM private key of --client-certificate"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a server that is not up (yet), and for each answer (default 60)",
    )


def server_arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the server flags (naming the flag), or None."""
    if args.timeout <= 0:
        return f"--timeout: must be > 0 seconds, got {args.timeout}"
    if (args.client_certificate is None) != (args.client_key is None):
        return "--client-certificate and --client-key: give both for mutual TLS"
    for flag in ("root_certificates", "client_certificate", "client_key"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            return f"--{flag.replace('_', '-')}: no such file {path}"
    return None


def server_client(args: argparse.Namespace, **options):
    """A ``Client`` for the servers, model and security the flags name."""
    from crossfield.client.client import Client

    servers = [a.strip() for s in (args.server or [DEFAULT_SERVER]) for a in s.split(",")]
    return Client(
        [s for s in servers if s],
        model=args.model,
        version=args.version,
        head=args.head,
        token=args.token or os.environ.get("CROSSFIELD_TOKEN"),
        tls=args.tls,
        root_certificates=_read(args.root_certificates),
        client_certificate=_read(args.client_certificate),
        client_key=_read(args.client_key),
        allow_extrapolation=args.allow_extrapolation,
        timeout=args.timeout,
        **options,
    )


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None
