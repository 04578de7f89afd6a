"""Energy conservation of the default model in NVE, in-process and through a server.

    python bench/nve_drift.py [--quick] [--out docs/nve_drift.json]

For each system (a water cluster on ``gfn2_xtb``, fcc Cu on ``emt``, a Pt(111) slab with
CO on ``gfn1_xtb``) and each way of running the model (in-process float64 and float32;
a real ``crossfield serve`` subprocess in float32 and float64, driven through
``RemoteCalculator``), velocity Verlet from the same initial velocities, and:

- **drift**: slope of a straight line fitted to the total energy, eV per atom per ps;
- **fluctuation**: RMS of the total energy about that line, eV per atom (Verlet's
  shadow-energy oscillation, which scales as dt^2, plus round-off).

A model that jumps at its cutoff drifts by the jump times the number of crossings, at
any time step; a smooth one shows a bounded oscillation and a drift that float64 cannot
resolve. JSON and a PNG of the energy traces are written next to ``--out``.

The functions here are also what ``tests/test_default_model.py`` runs, so the figures in
the README and the test's checks are the same code.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet


@dataclass(frozen=True)
class System:
    name: str
    head: str
    timestep_fs: float
    temperature_k: float

    def atoms(self) -> Atoms:
        return BUILDERS[self.name]()


def water_cluster() -> Atoms:
    """Four waters ~3 A apart: intermolecular pairs cross the 4.5 A cutoff all the time."""
    cluster = Atoms()
    for k, offset in enumerate([(0, 0, 0), (2.9, 0, 0.3), (0.2, 2.9, 0), (3.0, 3.0, 0.5)]):
        water = molecule("H2O")
        water.rotate(40 * k, "z")
        water.translate(offset)
        cluster += water
    return cluster


def copper() -> Atoms:
    """fcc Cu, 32 atoms: the third neighbour shell (4.41 A) sits at the 4.5 A cutoff."""
    return bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)


def platinum_co() -> Atoms:
    slab = fcc111("Pt", size=(2, 2, 3), a=3.92, vacuum=6.0)
    co = molecule("CO")
    co.rotate(180, "x")  # carbon down
    add_adsorbate(slab, co, 1.85, "ontop")
    return slab


BUILDERS = {"water_cluster": water_cluster, "copper": copper, "platinum_co": platinum_co}
SYSTEMS = (
    System("water_cluster", "gfn2_xtb", timestep_fs=0.25, temperature_k=300.0),
    System("copper", "emt", timestep_fs=2.0, temperature_k=300.0),
    System("platinum_co", "gfn1_xtb", timestep_fs=0.5, temperature_k=300.0),
)


def run_nve(
    atoms: Atoms, calculator, timestep_fs: float, steps: int, temperature_k: float, seed: int = 0
) -> np.ndarray:
    """Total energies (eV) of ``steps`` velocity-Verlet steps (plus the start).

    Velocities are Maxwell-Boltzmann at twice ``temperature_k`` (equipartition halves it),
    without centre-of-mass motion or, for molecules, rotation.
    """
    atoms = atoms.copy()
    atoms.calc = calculator
    # Maxwell-Boltzmann momenta drawn here (ASE renamed its helper across versions)
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(atoms.get_masses() * units.kB * 2 * temperature_k)[:, None]
    atoms.set_momenta(sigma * rng.normal(size=(len(atoms), 3)))
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    energies = [atoms.get_total_energy()]
    dynamics = VelocityVerlet(atoms, timestep_fs * units.fs)
    for _ in range(steps):
        dynamics.run(1)
        energies.append(atoms.get_total_energy())
    return np.array(energies)


def drift_and_fluctuation(
    energies: np.ndarray, timestep_fs: float, num_atoms: int
) -> tuple[float, float]:
    """(drift in eV/atom/ps, RMS about the linear fit in eV/atom)."""
    time_ps = np.arange(len(energies)) * timestep_fs * 1e-3
    slope, intercept = np.polyfit(time_ps, energies, 1)
    residual = energies - (slope * time_ps + intercept)
    return float(slope / num_atoms), float(np.sqrt(np.mean(residual**2)) / num_atoms)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(dtype: str, extra: tuple[str, ...] = ()):
    """``crossfield serve`` (the default model) in a subprocess; yields its address."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "crossfield.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--dtype",
        dtype,
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    address = f"127.0.0.1:{port}"
    try:
        wait_for(address, process)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for(address: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"server at {address} not serving after {timeout} s")


def in_process(dtype: str, head: str):
    import torch

    from crossfield.model.calculator import CrossfieldCalculator
    from crossfield.model.presets import default_model

    return CrossfieldCalculator(
        default_model(getattr(torch, dtype)), head=head, dtype=getattr(torch, dtype)
    )


def remote(address: str, head: str):
    from crossfield.client import RemoteCalculator

    return RemoteCalculator(address, model="default", head=head)


def measure(steps: int) -> list[dict]:
    rows = []

    def record(system: System, mode: str, calculator) -> None:
        atoms = system.atoms()
        started = time.perf_counter()
        energies = run_nve(atoms, calculator, system.timestep_fs, steps, system.temperature_k)
        drift, fluctuation = drift_and_fluctuation(energies, system.timestep_fs, len(atoms))
        rows.append(
            {
                "system": system.name,
                "head": system.head,
                "mode": mode,
                "atoms": len(atoms),
                "timestep_fs": system.timestep_fs,
                "steps": steps,
                "drift_ev_per_atom_per_ps": drift,
                "fluctuation_ev_per_atom": fluctuation,
                "seconds": time.perf_counter() - started,
                "energies": energies.tolist(),
            }
        )
        print(
            f"{system.name:14s} {mode:20s} drift {drift:+.2e} eV/atom/ps, "
            f"fluctuation {fluctuation:.2e} eV/atom",
            flush=True,
        )

    for system in SYSTEMS:
        for dtype in ("float64", "float32"):
            record(system, f"in-process {dtype}", in_process(dtype, system.head))
    for dtype in ("float32", "float64"):
        with served(dtype) as address:
            for system in SYSTEMS:
                record(system, f"server {dtype}", remote(address, system.head))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    figure, axes = plt.subplots(1, len(systems), figsize=(5 * len(systems), 3.6))
    for axis, name in zip(np.atleast_1d(axes), systems):
        for row in (r for r in rows if r["system"] == name):
            energies = np.array(row["energies"])
            time_fs = np.arange(len(energies)) * row["timestep_fs"]
            axis.plot(time_fs, (energies - energies[0]) / row["atoms"] * 1e3, label=row["mode"])
        axis.set_title(f"{name} ({rows[0]['steps']} steps)")
        axis.set_xlabel("time (fs)")
        axis.set_ylabel("E(t) - E(0) (meV/atom)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 steps")
    parser.add_argument("--out", type=Path, default=Path("docs/nve_drift.json"))
    args = parser.parse_args(argv)
    rows = measure(200 if args.quick else args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
