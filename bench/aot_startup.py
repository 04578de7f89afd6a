"""Compile once, load in seconds: the AOTInductor backend on the CPU, side by side.

    python bench/aot_startup.py --threads 1 [--repeats 7] [--json docs/aot.json]

For the shipped default model (float32): the cold build of its package (``crossfield
compile``: export, AOTInductor, check on every head), the warm load from the cache (what
a restarted server pays), the time to serving of ``crossfield serve`` on that cache with
``--backend aot``, ``auto`` (the default, which finds the package) and ``eager``, the time
per batch of the package against eager on the same batches, and the time per MD step
(velocity Verlet, 8-atom Cu) of ``CrossfieldCalculator`` with its default backend (auto:
the package) against ``backend="eager"``; both interleaved so both see the same machine
load. The README's torch.compile cold start (560-816 s) is the figure this replaces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ase.build import bulk, molecule

from crossfield.model import Structure, build_batch
from crossfield.model.backends import compile_model, inference_step
from crossfield.model.presets import default_model


def workloads(model) -> dict[str, tuple]:
    config = model.config
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 4)
    crystal.rattle(0.05, seed=1)
    names = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4"]
    molecules = [molecule(names[i % len(names)]) for i in range(32)]
    head_crystal, head_molecules = "emt", config.head_names[0]
    batches = {
        "copper_8": ([Structure.from_atoms(small_copper(), head=head_crystal)], True),
        "crystal_64": ([Structure.from_atoms(crystal, head=head_crystal)], True),
        "molecules_32": ([Structure.from_atoms(m, head=head_molecules) for m in molecules], False),
        "water_1": ([Structure.from_atoms(molecule("H2O"), head=head_molecules)], False),
    }
    return {
        name: (
            build_batch(s, config.elements, config.r_max, config.head_names, torch.float32),
            periodic,
        )
        for name, (s, periodic) in batches.items()
    }


def small_copper():
    copper = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)  # 8 atoms
    copper.rattle(0.05, seed=2)
    return copper


def md_steps(model, cache: Path, repeats: int, steps: int = 20) -> dict:
    """Milliseconds per velocity Verlet step of 8-atom Cu through CrossfieldCalculator:
    its default backend (auto, which finds the package in ``cache``) against eager."""
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    from crossfield.model.calculator import CrossfieldCalculator

    calculators = {
        "auto": CrossfieldCalculator(model, "emt", torch.float32, cache_dir=cache),
        "eager": CrossfieldCalculator(model, "emt", torch.float32, backend="eager"),
    }
    times: dict[str, list[float]] = {label: [] for label in calculators}
    for _ in range(repeats):
        for label, calculator in calculators.items():
            atoms = small_copper()
            atoms.calc = calculator
            dynamics = VelocityVerlet(atoms, timestep=1.0 * fs)
            dynamics.run(2)  # untimed: the first evaluations of this trajectory
            start = time.perf_counter()
            dynamics.run(steps)
            times[label].append((time.perf_counter() - start) / steps)
    row = {"auto_backend": calculators["auto"].backend}
    row.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()})
    row["speedup_vs_eager"] = row["eager_ms"] / row["auto_ms"]
    return row


def time_to_serving(backend: str, cache: Path, threads: int) -> float:
    """Seconds from starting ``crossfield serve`` to its "listening" line."""
    command = [sys.executable, "-m", "crossfield.cli", "serve", "--backend", backend]
    command += ["--compile-cache", str(cache), "--port", "0", "--metrics-port", "-1"]
    command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CROSSFIELD_TOKEN": ""}
    start = time.monotonic()
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        for line in server.stdout:
            if "listening on port" in line:
                return time.monotonic() - start
        raise RuntimeError(f"crossfield serve --backend {backend} exited before serving")
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = default_model(torch.float32)
    cache = Path(tempfile.mkdtemp(prefix="crossfield-aot-bench-"))
    result: dict = {"model": "default", "dtype": "float32", "threads": args.threads}

    cold = compile_model(model, "aot", torch.float32, "cpu", cache)
    report = cold.warm_up()
    result["cold_build_and_check_s"] = report.seconds
    warm = compile_model(model, "aot", torch.float32, "cpu", cache)
    report = warm.warm_up()
    assert warm.loaded_from_cache
    result["warm_load_and_check_s"] = report.seconds
    result["max_force_error_vs_eager"] = report.max_force_error
    result["time_to_serving_s"] = {
        backend: time_to_serving(backend, cache, args.threads)
        for backend in ("aot", "auto", "eager")
    }
    print(json.dumps(result), flush=True)

    eager = inference_step(copy_frozen(model))
    rows = []
    for name, (batch, periodic) in workloads(model).items():
        times: dict[str, list[float]] = {"aot": [], "eager": []}
        for runner in (warm, eager):  # one untimed call each
            run_once(runner, batch, periodic)
        for _ in range(args.repeats):
            for label, runner in (("aot", warm), ("eager", eager)):
                start = time.perf_counter()
                run_once(runner, batch, periodic)
                times[label].append(time.perf_counter() - start)
        row = {"workload": name, "atoms": batch.num_atoms}
        row.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()})
        row["speedup_vs_eager"] = row["eager_ms"] / row["aot_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["workloads"] = rows
    result["md_step_copper_8"] = md_steps(model, cache, args.repeats)
    print(json.dumps(result["md_step_copper_8"]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


def copy_frozen(model):
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def run_once(runner, batch, periodic: bool) -> None:
    with torch.set_grad_enabled(True):
        runner(batch, True, periodic)


if __name__ == "__main__":
    main()
