"""Serving throughput: N concurrent gRPC clients vs in-process evaluation.

For each workload (small molecules; 64-atom silicon crystals) this starts a real server on
loopback, runs N client threads in a separate process without torch (each sends one structure at a
time and waits for its answer, like an MD driver), and reports structures/s and atoms/s. The
clients talk to the server in one of two ways, each measured:

  unary:    one Compute call per structure (what a screening script without streams does);
  sessions: each client an MD driver on its own molecule or crystal, through an MD session
            (``Client.session``, what ``RemoteCalculator`` uses by default): the structure
            once, then only new positions, the server keeping its Verlet list.
Two references evaluate the same structures in this process, without gRPC:

  (a) batched: in batches of the mean size the server's batcher formed (read from its
      Prometheus metrics), graph building included; the limit the server can approach;
  (b) one at a time: one structure per model call, what a client without a server does.

"busy" is the fraction of the run the server's runner spent computing batches. The server
runs with its default batching settings. Aims (issue 16): molecules >= 0.9 of (a) and
>= 8x (b); crystals never below (b). Writes ``docs/serve_throughput.json`` and a chart
beside it (``.png``).

Usage: python bench/serve_throughput.py [--clients 32] [--model default|small] [--quick]
       [--model-process off|on|both] [--backend eager|aot|compile|script]
       [--out docs/serve_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from crossfield.v1 import inference_pb2
from crossfield.v1.messages import compute_request

COMPUTE = "/crossfield.v1.Inference/Compute"


def _race(client, work: list) -> float:
    """Run ``client(item, ready)`` in one thread per item of ``work``; each calls
    ``ready()`` once connected. Returns the wall time from the moment all are ready until
    all have finished."""
    barrier = threading.Barrier(len(work) + 1)
    threads = [threading.Thread(target=client, args=(item, barrier.wait)) for item in work]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _run_clients(address: str, batches: list[list[bytes]]) -> tuple[float, list[str]]:
    """One thread per client, each with its own channel, sending its requests in turn;
    returns the wall time from the moment all clients are connected, and any errors."""
    import grpc

    errors: list[str] = []

    def client(requests: list[bytes], ready) -> None:
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary(COMPUTE)  # raw bytes in and out
            grpc.channel_ready_future(channel).result(timeout=60)
            ready()
            for request in requests:
                try:
                    inference_pb2.ComputeResponse.FromString(call(request, timeout=120))
                except grpc.RpcError as err:
                    errors.append(f"{err.code()}: {err.details()}")

    return _race(client, batches), errors


def _run_session_clients(address: str, trajectories: list[list[tuple]]) -> tuple[float, list[str]]:
    """One thread per client, each an MD driver evaluating its own trajectory (numbers,
    positions, cell, pbc per step) through one session of the crossfield client."""
    from ase import Atoms

    from crossfield.client import Client, CrossfieldError

    errors: list[str] = []

    def client(steps: list[tuple], ready) -> None:
        with Client(address, model="bench", timeout=120) as remote:
            session = remote.session()
            ready()
            atoms = None
            for numbers, positions, cell, pbc in steps:
                if atoms is None:
                    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
                atoms.positions = positions  # the same atoms, moved: a session step
                wanted = ("energy", "forces", "stress") if any(pbc) else ("energy", "forces")
                try:
                    session.compute(atoms, wanted)
                except CrossfieldError as err:
                    errors.append(str(err))
            session.close()

    return _race(client, [t for t in trajectories if t]), errors


def _client_main(address: str, path: str) -> int:
    """Entry point of the client process (no torch): requests from a pickle, JSON out."""
    with open(path, "rb") as handle:
        mode, batches = pickle.load(handle)
    run = _run_session_clients if mode == "sessions" else _run_clients
    elapsed, errors = run(address, batches)
    print(json.dumps({"elapsed": elapsed, "errors": errors[:5], "failed": len(errors)}))
    return 0


def workload(kind: str, count: int, clients: int, seed: int = 0):
    """``count`` structures, small molecules (3-12 atoms) or 64-atom Si crystals, as
    ``clients`` trajectories: client k's structure follows its own template and takes a
    small random step each time (an MD driver's next positions), in the order
    ``_trajectories`` deals them out."""
    from ase.build import bulk, molecule

    from crossfield.model import Structure

    rng = np.random.default_rng(seed)
    if kind == "molecules":
        templates = [
            molecule(n) for n in ("H2O", "CH4", "NH3", "CH3OH", "C6H6", "CH3CH2OH", "HCOOH")
        ]
    else:
        templates = [bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))]
    structures = []
    current = [templates[k % len(templates)].copy() for k in range(clients)]
    for index in range(count):
        atoms = current[index % clients]
        atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
        structures.append(Structure.from_atoms(atoms.copy()))  # from_atoms keeps views
    return structures


def _trajectories(structures, clients: int) -> list[list]:
    """Client k gets structures k, k + clients, ...: its own trajectory (``workload``)."""
    return [structures[rank::clients] for rank in range(clients)]


def properties(structure) -> tuple[str, ...]:
    return ("energy", "forces", "stress") if any(structure.pbc) else ("energy", "forces")


def serve_and_load(
    model, structures, clients: int, dtype, mode: str, model_process: bool = False, backend=None
) -> tuple[float, float, float]:
    """Throughput of a real server under ``clients`` concurrent clients talking ``mode``
    (unary or sessions), the model evaluated in the server's process or (``model_process``)
    in a process of its own; returns (structures per second, mean batch size the batcher
    formed, fraction of the time the runner was computing). ``backend``: the server's
    ``Backend`` (default eager)."""
    from crossfield.server.app import InferenceServer, ServerConfig
    from crossfield.server.models import Backend

    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        device="cpu",
        dtype=dtype,
        model_process=model_process,
        backend=backend or Backend(),
    )
    server = InferenceServer(config)
    server.add_model(model, "bench", "1")
    server.start()
    try:
        if mode == "sessions":
            steps = [(s.numbers, s.positions, s.cell, s.pbc) for s in structures]
        else:
            steps = [
                compute_request(
                    s.numbers,
                    s.positions,
                    s.cell if any(s.pbc) else None,
                    s.pbc if any(s.pbc) else None,
                    model="bench",
                    properties=properties(s),
                    id=str(i),
                ).SerializeToString()
                for i, s in enumerate(structures)
            ]
        with tempfile.NamedTemporaryFile(suffix=".pickle") as handle:
            pickle.dump((mode, _trajectories(steps, clients)), handle)
            handle.flush()
            address = f"127.0.0.1:{server.port}"
            command = [sys.executable, __file__, "--client", address, handle.name]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        report = json.loads(output.strip().splitlines()[-1])
        if report["failed"]:
            raise RuntimeError(f"{report['failed']} requests failed, e.g. {report['errors'][0]}")
        elapsed = report["elapsed"]
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics")
            .read()
            .decode()
        )
    finally:
        server.stop(grace=5.0)
    count = _sample(text, "crossfield_batch_structures_count")
    total = _sample(text, "crossfield_batch_structures_sum")
    busy = _sample(text, "crossfield_compute_seconds_sum") / elapsed
    return len(structures) / elapsed, total / count, busy


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def in_process(model, structures, batch_size: int) -> float:
    """Structures per second evaluating ``structures`` in batches of ``batch_size`` with
    graph building and per-structure results in numpy, as the runner does. One batch of
    that size runs first, untimed, as the server's model had run batches of that size
    long before: a compiled model's first calls at a new batch shape can be slow (in one
    run an AOT package's first pass over 48 crystals in pairs gave 25.7 structures/s,
    the next 35.5)."""
    from crossfield.model import evaluate

    stress = any(any(s.pbc) for s in structures)
    evaluate(model, structures[:batch_size], compute_stress=stress)
    start = time.perf_counter()
    for first in range(0, len(structures), batch_size):
        evaluate(model, structures[first : first + batch_size], compute_stress=stress)
    return len(structures) / (time.perf_counter() - start)


def servable(model, dtype, name: str, cache: Path | None):
    """The server's ``Backend`` for ``name`` and the model the in-process references run:
    ``model`` itself for eager, else compiled (and for aot, its package built and cached
    first, so the server loads it as ``crossfield serve`` would after ``crossfield compile``)."""
    from crossfield.model.backends import default_cache_dir
    from crossfield.server.models import Backend, ready_to_serve

    if name == "eager":
        return Backend(), model
    backend = Backend(name, cache or default_cache_dir())
    compiled, _ = ready_to_serve(model, name, dtype, "cpu", backend.cache_dir, backend.shapes)
    return backend, compiled


def load_model(name: str, dtype):
    from crossfield.model import HeadConfig, ModelConfig, build_model
    from crossfield.model.presets import random_model

    if name == "default":
        return random_model().to(dtype).eval()
    config = ModelConfig(
        elements=[1, 6, 7, 8, 14],
        heads=[HeadConfig("pbe", e0s=[0.0] * 5)],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
    )
    return build_model(config, seed=0).to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return _client_main(*argv[1:3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--model", choices=("default", "small"), default="default")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--molecules", type=int, default=512, help="molecules sent per run")
    parser.add_argument("--crystals", type=int, default=96, help="64-atom crystals sent per run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: no spin-wait thrash on small shared machines)",
    )
    parser.add_argument(
        "--model-process",
        choices=("off", "on", "both"),
        default="both",
        help="evaluate the model in the server's process (off, crossfield serve "
        "--no-model-process), in a process of its own (on, crossfield serve's default for "
        "an eager model on a CPU), or measure both side by side",
    )
    parser.add_argument(
        "--backend",
        choices=("eager", "aot", "compile", "script"),
        default="eager",
        help="how the server and the in-process references run the model (aot: the package "
        "is built into --compile-cache first if it is not there, minutes)",
    )
    parser.add_argument(
        "--compile-cache", type=Path, default=None, help="compiled artefacts (default: the user's)"
    )
    parser.add_argument("--quick", action="store_true", help="half the structures")
    parser.add_argument("--out", type=Path, default=Path("docs/serve_throughput.json"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, dtype)
    backend, reference = servable(model, dtype, args.backend, args.compile_cache)
    scale = 2 if args.quick else 1
    placements = {"off": [False], "on": [True], "both": [False, True]}[args.model_process]
    print(
        f"model={args.model} dtype={args.dtype} clients={args.clients} "
        f"torch_threads={torch.get_num_threads()}"
    )
    header = (
        f"{'workload':<30} {'n':>5} {'server s/s':>11} {'atoms/s':>9} {'batch':>6} {'busy':>5} "
        f"{'(a) s/s':>9} {'(b) s/s':>9} {'server/(a)':>10} {'server/(b)':>10}"
    )
    print(header)
    rows: dict[str, dict[str, dict]] = {}
    for kind, count in (
        ("molecules", args.molecules // scale),
        ("crystals", args.crystals // scale),
    ):
        structures = workload(kind, count, args.clients)
        atoms = sum(len(s.numbers) for s in structures) / len(structures)
        in_process(reference, structures[:4], 4)  # warm up
        single = in_process(reference, structures[: max(8, count // 4)], 1)
        rows[kind] = {}
        for mode, placed in [(m, p) for m in ("unary", "sessions") for p in placements]:
            served, batch, busy = serve_and_load(
                model, structures, args.clients, dtype, mode, placed, backend
            )
            batched = in_process(reference, structures, max(1, round(batch)))
            if placed:
                mode += ", model process"
            print(
                f"{kind + ', ' + mode:<30} {count:>5} {served:>11.1f} {served * atoms:>9.0f} "
                f"{batch:>6.1f} {busy:>5.0%} {batched:>9.1f} {single:>9.1f} "
                f"{served / batched:>10.2f} {served / single:>10.2f}"
            )
            rows[kind][mode] = {
                "structures": count,
                "mean_atoms": atoms,
                "server_per_s": served,
                "mean_batch": batch,
                "busy": busy,
                "in_process_batched_per_s": batched,
                "one_at_a_time_per_s": single,
                "vs_batched": served / batched,
                "vs_one_at_a_time": served / single,
            }
    result = {
        "conditions": {
            "model": args.model,
            "dtype": args.dtype,
            "backend": args.backend,
            "clients": args.clients,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "server": "InferenceServer, default batching settings; clients in another process",
            "load": "shared machine: other jobs may run",
        },
        "workloads": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    """Server throughput as multiples of the two in-process references, with the aims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(kind, mode) for kind, modes in result["workloads"].items() for mode in modes]
    figure, axis = plt.subplots(figsize=(max(7.2, 1.2 * len(runs)), 3.6))
    ratios = (
        ("vs_batched", "server / in-process batched"),
        ("vs_one_at_a_time", "server / one at a time"),
    )
    for k, (key, label) in enumerate(ratios):
        heights = [result["workloads"][kind][mode][key] for kind, mode in runs]
        bars = axis.bar([i + 0.4 * k for i in range(len(runs))], heights, 0.4, label=label)
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.axhline(1.0, color="black", linewidth=0.8)
    labels = ["\n".join((kind, *mode.split(", "))) for kind, mode in runs]
    axis.set_xticks([i + 0.2 for i in range(len(runs))], labels)
    axis.set_ylabel("throughput ratio")
    conditions = result["conditions"]
    axis.set_title(
        f"{conditions['clients']} clients, {conditions['model']} model, {conditions['dtype']}, "
        f"{conditions.get('backend', 'eager')}, "
        f"{conditions['cpus']} CPUs (shared)",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
