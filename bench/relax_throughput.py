"""Relaxation throughput: ``Relax`` on a server vs the ways a farm relaxes without it.

One run, the same model (the shipped default, float32, head gfn1_xtb), the same mixed
structures (rattled molecules and Cu/Pt slabs with an adsorbate, 3-31 atoms), FIRE to
the same fmax, measured side by side:

  relax:  ``Client.relax_many`` -> the server's ``Relax`` (all structures in flight, one
          full batch per optimiser step);
  (a)     ASE FIRE through ``RemoteCalculator`` from 32 client threads (one round trip
          per step per structure; the server batches whatever the threads have in flight);
  (b)     torch-sim's batched FIRE in this process (``InFlightAutoBatcher`` with the
          server's atom budget, the ASE flavour of FIRE);
  (c)     ASE FIRE in this process, one structure at a time.

The server is a ``crossfield serve`` subprocess (``--threads`` as this process's torch),
idle while (b) and (c) run. Reported: structures relaxed per second, force evaluations,
and the ratios of ``relax`` to each; the relaxed energies are compared with (c) as a
check that every method reached the same minima. Only ratios measured in one run mean
anything on a shared machine.

Usage: python bench/relax_throughput.py [--count 200] [--quick] [--out docs/relax_throughput]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

FMAX = 0.05
MAX_STEPS = 300
HEAD = "gfn1_xtb"
MOLECULES = ["H2O", "NH3", "CH4", "CH3OH", "C2H4", "CH3CH2OH", "C6H6", "CH3COOH", "HCOOH"]


def structures(count: int, seed: int = 0) -> list:
    """Mixed molecules and slabs with adsorbates, rattled so that each needs relaxing."""
    from ase.build import add_adsorbate, fcc111, molecule

    rng = np.random.default_rng(seed)
    templates = [molecule(name) for name in MOLECULES]
    for metal, size, adsorbate in (("Cu", (2, 2, 3), "O"), ("Pt", (3, 3, 3), "CO")):
        slab = fcc111(metal, size=size, vacuum=6.0)
        add_adsorbate(slab, molecule(adsorbate) if len(adsorbate) > 1 else adsorbate, 1.8, "fcc")
        templates.append(slab)
    result = []
    for index in range(count):
        atoms = templates[index % len(templates)].copy()
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        result.append(atoms)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "crossfield"), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "0", "--device", "cpu"]
    command += ["--dtype", "float32", "--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    from crossfield.client import Client

    client = Client(address, timeout=120)
    client.list_models()  # waits until it serves
    client.close()
    return process, address


def run_relax(address: str, atoms_list: list) -> dict:
    from crossfield.client import Client
    from crossfield.client.relax import relax_many

    client = Client(address, head=HEAD)
    start = time.perf_counter()
    results = list(relax_many(client, atoms_list, fmax=FMAX, max_steps=MAX_STEPS))
    seconds = time.perf_counter() - start
    client.close()
    results.sort(key=lambda r: r.index)
    return summary(
        seconds,
        [r.energy for r in results],
        [r.steps + 1 for r in results],
        [r.converged for r in results],
    )


def run_ase_remote(address: str, atoms_list: list, threads: int = 32) -> dict:
    from ase.optimize import FIRE

    from crossfield.client import Client, RemoteCalculator

    work = list(enumerate(atoms_list))
    out: dict[int, tuple] = {}
    lock = threading.Lock()

    def worker() -> None:
        client = Client(address, head=HEAD, timeout=600)  # one channel per client thread
        while True:
            with lock:
                if not work:
                    client.close()
                    return
                index, atoms = work.pop(0)
            atoms = atoms.copy()
            atoms.calc = RemoteCalculator(client, head=HEAD)
            opt = FIRE(atoms, logfile=None)
            converged = opt.run(fmax=FMAX, steps=MAX_STEPS)
            out[index] = (atoms.get_potential_energy(), opt.nsteps + 1, converged)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    seconds = time.perf_counter() - start
    energies, evaluations, converged = zip(*(out[i] for i in range(len(atoms_list))))
    return summary(seconds, energies, evaluations, converged)


def run_torchsim(model, atoms_list: list) -> dict:
    import torch
    import torch_sim as ts

    from crossfield.model.torchsim import CrossfieldTorchSimModel

    ts_model = CrossfieldTorchSimModel(model, head=HEAD, dtype=torch.float32, compute_stress=False)
    converged_fn = ts.runners.generate_force_convergence_fn(FMAX, include_cell_forces=False)
    batcher = ts.InFlightAutoBatcher(
        ts_model, memory_scales_with="n_atoms", max_memory_scaler=4096, max_iterations=MAX_STEPS
    )
    calls = [0]
    forward = ts_model.forward

    def counted(state, **kwargs):
        calls[0] += 1
        return forward(state, **kwargs)

    ts_model.forward = counted
    start = time.perf_counter()
    state = ts.io.atoms_to_state(atoms_list, torch.device("cpu"), torch.float32)
    final = ts.optimize(
        system=state,
        model=ts_model,
        optimizer=ts.optimizers.fire,
        convergence_fn=converged_fn,
        autobatcher=batcher,
        max_steps=MAX_STEPS,
    )
    seconds = time.perf_counter() - start
    ts_model.forward = forward
    energies = ts_model(final)["energy"].double().numpy()
    converged = converged_fn(final)
    return {**summary(seconds, energies, None, converged.tolist()), "model_calls": calls[0]}


def run_ase_local(model, atoms_list: list) -> dict:
    import torch
    from ase.optimize import FIRE

    from crossfield.model.calculator import CrossfieldCalculator

    calc = CrossfieldCalculator(model, head=HEAD, dtype=torch.float32)
    energies, evaluations, converged = [], [], []
    start = time.perf_counter()
    for atoms in atoms_list:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = FIRE(atoms, logfile=None)
        converged.append(opt.run(fmax=FMAX, steps=MAX_STEPS))
        energies.append(atoms.get_potential_energy())
        evaluations.append(opt.nsteps + 1)
    return summary(time.perf_counter() - start, energies, evaluations, converged)


def summary(seconds: float, energies, evaluations, converged) -> dict:
    count = len(energies)
    result = {
        "seconds": round(seconds, 3),
        "structures_per_second": round(count / seconds, 3),
        "converged": int(sum(bool(c) for c in converged)),
        "energies": [float(e) for e in energies],
    }
    if evaluations is not None:
        result["force_evaluations"] = int(sum(evaluations))
    return result


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    rates = [report["methods"][n]["structures_per_second"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(names[::-1], rates[::-1], color=["#888"] * (len(names) - 1) + ["#1f6feb"])
    for bar, rate in zip(bars, rates[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {rate:.2f}", va="center")
    ax.set_xlabel("structures relaxed per second (higher is better)")
    ax.set_title(
        f"{report['count']} structures, FIRE to fmax {FMAX} eV/A, default model float32, "
        f"{report['threads']} CPU threads",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="24 structures")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.png")
    args = parser.parse_args()
    import torch

    from crossfield.model.presets import default_model

    torch.set_num_threads(args.threads)
    count = 24 if args.quick else args.count
    atoms_list = structures(count)
    model = default_model(torch.float32)
    process, address = start_server(args.threads)
    methods = {}
    try:
        methods["relax (Relax RPC)"] = run_relax(address, atoms_list)
        methods["(a) ASE FIRE via RemoteCalculator, 32 threads"] = run_ase_remote(
            address, atoms_list
        )
    finally:
        process.terminate()
        process.wait()
    methods["(b) torch-sim batched FIRE, in-process"] = run_torchsim(model, atoms_list)
    methods["(c) ASE FIRE in-process, one at a time"] = run_ase_local(model, atoms_list)
    methods = dict(reversed(list(methods.items())))  # slowest first in the chart
    relax = methods["relax (Relax RPC)"]
    reference = np.array(methods["(c) ASE FIRE in-process, one at a time"]["energies"])
    for name, result in methods.items():
        result["speedup_of_relax"] = round(
            relax["structures_per_second"] / result["structures_per_second"], 2
        )
        energies = np.array(result.pop("energies"))
        result["max_energy_difference_vs_c_eV"] = float(np.abs(energies - reference).max())
        print(
            f"{name:48s} {result['structures_per_second']:8.2f} structures/s  "
            f"({result['seconds']:.1f} s, {result['converged']}/{count} converged)  "
            f"Relax is {result['speedup_of_relax']:.2f}x"
        )
    report = {
        "count": count,
        "atoms": int(sum(len(a) for a in atoms_list)),
        "fmax": FMAX,
        "max_steps": MAX_STEPS,
        "threads": args.threads,
        "model": "default (float32), head " + HEAD,
        "methods": methods,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        chart(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
