"""MD latency: time per step through RemoteCalculator vs the same model in-process.

An MD driver sends one structure per step and waits for the forces, so what a server adds
to every step (serialisation, loopback gRPC, queueing in the batcher, the server's own
graph building) is paid in full. This runs VelocityVerlet on fcc copper crystals of 8 and
64 atoms twice: with ``CrossfieldCalculator`` in this process, and with ``RemoteCalculator``
against ``crossfield serve`` started as a separate process with the same model, dtype and
number of torch threads. It prints ms per step, the ratio remote / in-process and the
remote overhead per step, split into what the server reports (queue wait, compute) and
the rest (transport + client). Aim: overhead well under a millisecond beyond the model.

Usage: python bench/md_latency.py [--model default|small] [--steps 100] [--threads 1]
       [--dtype float32|float64] [--max-delay-ms 5] [--server HOST:PORT]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet

from crossfield.client import RemoteCalculator
from crossfield.model import HeadConfig, ModelConfig, build_model, save_checkpoint
from crossfield.model.calculator import CrossfieldCalculator
from crossfield.model.presets import default_model

SIZES = {8: (2, 1, 1), 64: (2, 2, 4)}


def small_model():
    """The size the client tests use: the model's own time is small, so overhead shows."""
    config = ModelConfig(
        elements=[1, 6, 7, 8, 13, 29],
        heads=[HeadConfig("pbe", e0s=[0.0] * 6)],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
    )
    return build_model(config, seed=0)


def crystal(atoms_count: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * SIZES[atoms_count]
    atoms.rattle(0.03, seed=1)
    atoms.set_momenta(np.random.default_rng(0).normal(scale=0.3, size=(len(atoms), 3)))
    return atoms


def time_md(calculator, atoms_count: int, steps: int, observe=None, warmup: int = 5) -> float:
    """Median seconds per VelocityVerlet step (one force evaluation each); the median of
    single steps rather than the mean, so that a busy machine's stalls do not count.
    ``observe()`` runs after every timed step."""
    atoms = crystal(atoms_count)
    atoms.calc = calculator
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dynamics.run(warmup)
    stamps = []

    def stamp() -> None:
        stamps.append(time.perf_counter())
        if observe is not None:
            observe()

    dynamics.attach(stamp)
    stamps.append(time.perf_counter())
    dynamics.run(steps)
    return float(np.median(np.diff(stamps)))  # after the warm-up, observers run per step


def start_server(args, checkpoint: Path | None) -> tuple[subprocess.Popen, str]:
    """``crossfield serve`` in its own process; returns it and its address."""
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
        "--dtype",
        args.dtype,
        "--device",
        "cpu",
        "--threads",
        str(args.threads),
        "--max-delay-ms",
        str(args.max_delay_ms),
    ]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint), "--name", "default"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    for line in server.stdout:
        if "listening on port" in line:
            port = int(line.split("listening on port")[1].split(",")[0])
            return server, f"127.0.0.1:{port}"
    raise RuntimeError(f"crossfield serve exited with {server.wait()} before listening")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("default", "small"), default="default")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="server batcher delay")
    parser.add_argument("--server", default=None, help="use a running server instead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = default_model() if args.model == "default" else small_model()
    checkpoint = None
    with tempfile.TemporaryDirectory() as folder:
        if args.model != "default" and args.server is None:
            checkpoint = Path(folder) / "small.pt"
            save_checkpoint(model, checkpoint)
        server, address = (None, args.server) if args.server else start_server(args, checkpoint)
        try:
            print(
                f"model {args.model}, {args.dtype}, {args.threads} torch thread(s) each side, "
                f"server max delay {args.max_delay_ms} ms, {args.steps} VelocityVerlet steps"
            )
            print(
                f"{'atoms':>5} {'in-process':>11} {'remote':>9} {'ratio':>6} {'overhead':>9} "
                f"{'server queue':>13} {'server compute':>15} {'rest':>9}"
            )
            for atoms_count in SIZES:
                local = time_md(CrossfieldCalculator(model, dtype=dtype), atoms_count, args.steps)
                with RemoteCalculator(address, model="default") as remote:
                    answers = []
                    far = time_md(
                        remote,
                        atoms_count,
                        args.steps,
                        observe=lambda r=remote, a=answers: a.append(r.last_result),
                    )
                queued = np.median([a.queue_seconds for a in answers[1:]])
                computed = np.median([a.compute_seconds for a in answers[1:]])
                rest = far - queued - computed
                print(
                    f"{atoms_count:>5} {local * 1e3:>8.2f} ms {far * 1e3:>6.2f} ms "
                    f"{far / local:>6.2f} {(far - local) * 1e3:>6.2f} ms "
                    f"{queued * 1e3:>10.2f} ms {computed * 1e3:>12.2f} ms {rest * 1e3:>6.2f} ms"
                )
            print(
                "overhead = remote - in-process per step; rest = remote - server queue - "
                "server compute (graph building, gRPC, encoding, client)"
            )
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
