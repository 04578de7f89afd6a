"""``crossfield serve``: run the inference server until SIGTERM or SIGINT.

``--repo PATH`` serves a model repository and follows it (new versions hot-load, see
``repository.py``); ``--checkpoint`` serves fixed files; with neither it serves the
project's default model under the name ``default`` (until a trained one ships, a
deterministic randomly initialised model, labelled so in its metadata).

Tokens come from ``$CROSSFIELD_TOKEN`` and ``$CROSSFIELD_ADMIN_TOKEN`` (or the flags, which
other users of the machine can read in the process list) and are never printed. This
module imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .graph_flags import add_graph_arguments, graph_limits

if TYPE_CHECKING:  # imported when the command runs
    from .model_child import Child

TOKEN_VARIABLE = "CROSSFIELD_TOKEN"
ADMIN_TOKEN_VARIABLE = "CROSSFIELD_ADMIN_TOKEN"


class _CheckpointAction(argparse.Action):
    """``--checkpoint PATH`` starts a new entry; a following ``--name`` names it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        entries = list(getattr(namespace, "checkpoints", None) or [])
        if option_string == "--checkpoint":
            entries.append([values, None])
        elif not entries or entries[-1][1] is not None:
            parser.error("--name must follow the --checkpoint it names")
        else:
            entries[-1][1] = values
        namespace.checkpoints = entries


class _Removed(argparse.Action):
    """A flag that no longer exists: refuse it with what to use instead (a deployment that
    still passes it must fail loudly, not run with a setting that means nothing)."""

    def __init__(self, option_strings, dest, message: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} was removed: {self.message}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC inference server",
        description="Serve Crossfield models over gRPC (crossfield.v1.Inference), with "
        "health checking, reflection and Prometheus metrics on a separate port.",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        action=_CheckpointAction,
        dest="checkpoints",
        help="Crossfield checkpoint or mace-torch .model file to serve (repeatable; a .model "
        "is converted on load); default: the default model",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        action=_CheckpointAction,
        dest="checkpoints",
        help="model name for the preceding --checkpoint (default: file stem)",
    )
    parser.add_argument(
        "--repo",
        metavar="PATH",
        type=Path,
        default=None,
        help="model repository to serve and follow (REPO/NAME/VERSION/model.pt)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=10.0,
        help="seconds between repository scans; 0: scan at start and on admin calls only",
    )
    parser.add_argument(
        "--version-policy",
        default="latest",
        help="versions to serve of models without REPO/NAME/config.json: latest, latest:N, "
        "all, specific:V1,V2 (default: latest)",
    )
    parser.add_argument("--host", default="[::]", help="gRPC listen address (default: all)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        help="Prometheus port; 0 picks a free one, -1 disables",
    )
    parser.add_argument(
        "--max-batch-atoms",
        type=int,
        help="atom budget of a batch (default 4096)",
    )
    parser.add_argument(
        "--max-batch-edges",
        type=int,
        help="edge budget of a batch (default: 131072 on a GPU, 12288 on a CPU, whose "
        "cores run larger batches slower per edge)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=5.0,
        help="longest a structure waits at an idle device for the batch-mates it expects "
        "(after a batch of k, k of them); a lone client never waits (ms)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=4096,
        help="structures queued per model before RESOURCE_EXHAUSTED",
    )
    parser.add_argument("--max-atoms-per-structure", type=int, default=4096)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--backend",
        choices=("auto", "eager", "compile", "script", "cueq", "aot"),
        default="auto",
        help="how models run: eager PyTorch, torch.compile, TorchScript, cuEquivariance "
        "kernels (cueq: the [cueq] extra, and cuequivariance-ops-torch on CUDA), or an "
        "AOTInductor package (aot: loaded from --compile-cache in seconds when 'crossfield "
        "compile' or an earlier start built it, else compiled once); auto: aot when the "
        "cache holds the model's package (2-5x faster than eager for small structures on "
        "a CPU), else eager, never compiling at start. Checked against eager on every head "
        "before serving. A repository model's config.json can choose its own (default: auto)",
    )
    parser.add_argument(
        "--compile-cache",
        metavar="PATH",
        type=Path,
        default=None,
        help="folder for compiled artefacts, so a restart does not compile again "
        "(default: $XDG_CACHE_HOME/crossfield or ~/.cache/crossfield; keep it private "
        "to the server's user)",
    )
    parser.add_argument(
        "--compile-shapes",
        choices=("dynamic", "buckets"),
        default="dynamic",
        help="--backend compile: one graph for every batch size (dynamic), or one per size "
        "bucket (buckets: on CUDA each bucket is replayed as a CUDA graph, for small batches "
        "that would otherwise be bound by kernel launches)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op CPU threads (default: torch's choice)",
    )
    parser.add_argument(
        "--model-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU only: evaluate the models in a process of their own, so that they do not "
        "share the interpreter lock with the server's I/O: 1.1-1.7x the molecules/s under "
        "32 clients in our runs, for one more hop per batch (0.1-1 ms; a lone MD session's "
        "steps of an eager model skip it). Default: on for a CPU's eager, compile and "
        "script models, off for AOT packages (whose lone MD steps would pay the hop) and GPUs",
    )
    parser.add_argument(
        "--max-workers",
        action=_Removed,
        help=argparse.SUPPRESS,
        message="the server runs on grpc.aio and an open stream costs no thread; bound "
        "clients with --max-calls-per-client, --max-streams-per-connection and "
        "--stream-idle-timeout instead",
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds running calls get to finish on SIGTERM"
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest gRPC message received or sent (default 16 MiB)",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM)")
    security.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="CA (PEM) that signs client certificates: requires mutual TLS",
    )
    security.add_argument(
        "--token",
        default=None,
        help=f"bearer token clients must send (default: ${TOKEN_VARIABLE}; prefer the variable)",
    )
    security.add_argument(
        "--admin-token",
        default=None,
        help=f"bearer token for Admin RPCs (default: ${ADMIN_TOKEN_VARIABLE}); without one, "
        "admin RPCs are refused",
    )
    security.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="more client tokens, one per line ('#' starts a comment): each is a client of "
        "its own for --max-calls-per-client",
    )
    security.add_argument(
        "--max-calls-per-client",
        type=int,
        default=0,
        help="calls in flight per client before RESOURCE_EXHAUSTED (0: no limit); a client "
        "is its bearer token when it sends a valid one, else its address",
    )
    _add_connection_arguments(parser)
    add_graph_arguments(parser)
    parser.set_defaults(func=run, checkpoints=[])


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Streams, HTTP/2 limits and keepalive (see server/streams.py and server/transport.py)."""
    group = parser.add_argument_group("streams and connections")
    group.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=120.0,
        help="seconds a stream (ComputeStream, ComputeSession, Relax) may keep the server "
        "waiting (sending nothing while "
        "nothing is in progress, or reading nothing) before it ends UNAVAILABLE; 0: never "
        "(default 120)",
    )
    group.add_argument(
        "--stream-window-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="estimated bytes of structures one stream may have read and not yet delivered "
        "(a Relax structure counts at the size of its largest answer, trajectory included); "
        "beyond it the stream's requests wait (default 8 MiB)",
    )
    group.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=100,
        help="concurrent HTTP/2 streams (calls) per client connection (default 100)",
    )
    group.add_argument(
        "--keepalive-time",
        type=float,
        default=60.0,
        help="seconds of silence after which the server pings a connection (default 60)",
    )
    group.add_argument(
        "--keepalive-timeout",
        type=float,
        default=20.0,
        help="seconds a ping may go unanswered before the connection is closed (default 20)",
    )
    group.add_argument(
        "--min-ping-interval",
        type=float,
        default=10.0,
        help="shortest interval between client pings the server accepts; faster pingers get "
        "GOAWAY (default 10; crossfield clients ping every 30)",
    )
    group.add_argument(
        "--max-connection-age",
        type=float,
        default=1800.0,
        help="seconds after which a connection is asked to reconnect (GOAWAY), so clients "
        "spread over replicas added since; 0: never (default 1800)",
    )
    group.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=None,
        help="seconds calls still running on such a connection may take before they are "
        "cancelled (default: until they end)",
    )


def read_token_file(path: Path) -> tuple[str, ...]:
    """Tokens of a --token-file: one per line, blank lines and '#' comments ignored."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"--token-file: cannot read {path}: {err.strerror}") from None
    lines = (line.partition("#")[0].strip() for line in text.splitlines())
    return tuple(line for line in lines if line)


def launch_model_process(args: argparse.Namespace) -> Child | None:
    """The model process, launched before this process imports torch when ``args`` will
    likely want one, so that the two import torch and the model side by side (seconds
    each) instead of one after the other; else None. Likely: not ``--no-model-process``,
    a CPU or the automatic device, and models from files (a repository's arrive after the
    start, and may all be AOT packages, which stay in this process: the child then starts
    with the first model that needs it). One that no model needs is ended at once."""
    if args.model_process is False or args.repo is not None:
        return None
    if args.device is not None and not args.device.startswith("cpu"):
        return None
    from .model_child import Child

    return Child(args.threads or 0)


def run(args: argparse.Namespace) -> int:
    child = launch_model_process(args)
    try:
        return serve(args, child)
    finally:
        if child is not None:  # ended by the server's stop; here when it never got that far
            child.discard()


def serve(args: argparse.Namespace, child: Child | None) -> int:
    """``crossfield serve`` itself; ``child``: a model process launched ahead, or None."""
    import logging
    import signal
    import threading

    import torch

    from crossfield.model.backends import default_cache_dir
    from crossfield.model.loading import load_model_file

    from .app import InferenceServer, ServerConfig
    from .batcher import BatchLimits
    from .models import Backend
    from .repository import VersionPolicy
    from .security import SecurityConfig
    from .streams import StreamLimits
    from .transport import Transport

    if args.repo is not None and args.checkpoints:
        raise SystemExit("crossfield serve: --repo and --checkpoint exclude each other")
    try:
        VersionPolicy.parse(args.version_policy)
        tokens = read_token_file(args.token_file) if args.token_file else ()
        token = args.token or os.environ.get(TOKEN_VARIABLE) or None
        if tokens and token is None:
            token, tokens = tokens[0], tokens[1:]
        security = SecurityConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            token=token,
            admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_VARIABLE) or None,
            max_calls_per_client=args.max_calls_per_client,
            more_tokens=tokens,
        )
        if security.tls:
            security.credentials()  # unreadable files fail now, not at the first call
        streams = StreamLimits(args.stream_idle_timeout, args.stream_window_bytes)
        transport = Transport(
            max_streams_per_connection=args.max_streams_per_connection,
            keepalive_time=args.keepalive_time,
            keepalive_timeout=args.keepalive_timeout,
            min_ping_interval=args.min_ping_interval,
            max_connection_age=args.max_connection_age or None,
            max_connection_age_grace=args.max_connection_age_grace,
        )
        graphs = graph_limits(args)
    except ValueError as err:
        raise SystemExit(f"crossfield serve: {err}") from None
    if args.repo is not None and not args.repo.is_dir():
        raise SystemExit(f"crossfield serve: --repo: {args.repo} is not a folder")
    from .ports import port_in_use

    for flag, host, port in (
        ("--port", args.host, args.port),
        ("--metrics-port", "0.0.0.0", args.metrics_port),
    ):
        if port > 0 and port_in_use(host, port):
            print(
                f"crossfield serve: {flag}: port {port} is in use (another server?); "
                "choose another, or 0 for any free port",
                file=sys.stderr,
            )
            return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        dtype=getattr(torch, args.dtype),
        limits=BatchLimits(
            max_atoms=args.max_batch_atoms,
            max_edges=args.max_batch_edges,
            max_delay=args.max_delay_ms / 1000.0,
            max_queue=args.max_queue,
            graphs=graphs,
        ),
        max_atoms_per_structure=args.max_atoms_per_structure,
        grace=args.grace,
        max_message_bytes=args.max_message_bytes,
        streams=streams,
        transport=transport,
        security=security,
        repository=args.repo,
        poll_interval=args.poll_interval,
        version_policy=args.version_policy,
        backend=Backend(
            args.backend, args.compile_cache or default_cache_dir(), args.compile_shapes
        ),
        model_process=args.model_process,
    )
    if args.device:
        config.device = args.device
    try:
        server = InferenceServer(config, model_child=child)
    except ValueError as err:  # e.g. --model-process on a GPU
        print(f"crossfield serve: {err}", file=sys.stderr)
        return 2
    try:
        if args.repo is None and not args.checkpoints:
            from crossfield.model.presets import default_model

            model = default_model()
            metadata = dict(getattr(model, "metadata", {}))
            server.add_model(model, "default", str(metadata.get("version", "0")), metadata)
        for path, name in args.checkpoints:
            model = load_model_file(path)  # a mace-torch .model is converted on load
            metadata = dict(getattr(model, "metadata", {}))
            version = str(metadata.get("version", "1"))
            server.add_model(model, name or Path(path).stem, version, metadata)
    except (ValueError, RuntimeError) as err:  # a backend that cannot run or compile this model
        raise SystemExit(f"crossfield serve: {err}") from None
    if server.runner.process is not None:
        server.runner.process.release_idle()  # launched ahead for models that stayed here

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    metrics = "off" if server.metrics_port is None else server.metrics_port
    pid = None if server.runner.process is None else server.runner.process.pid
    placement = "" if pid is None else f"; models evaluate in a model process, pid {pid}"
    print(
        f"crossfield serve: listening on port {server.port}, metrics on port {metrics}{placement}",
        flush=True,
    )
    while not stop.wait(0.5):
        pass
    print("crossfield serve: shutting down (finishing queued work)", flush=True)
    server.stop()
    print("crossfield serve: stopped", flush=True)
    return 0
