"""Small generated data sets and tiny configs for the training tests.

Data come from ASE's EMT on rattled, strained Cu/Al crystals (random substitution) and
fcc(111) slabs; a second "level of theory" adds a Morse pair potential to EMT, so a new
head has something different to learn. Labels are stored the way real data arrive:
in extxyz files with SinglePointCalculator results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

TINY_MODEL: dict[str, Any] = {
    "hidden_irreps": "8x0e+8x1o",
    "max_ell": 1,
    "correlation": 2,
    "r_max": 4.0,
    "num_bessel": 6,
    "radial_mlp": [16, 16],
    "readout_mlp_irreps": "8x0e",
}


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny models on a shared 2-core machine run far faster so."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _crystal(rng: np.random.Generator, elements: tuple[str, ...]) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6 + 0.1 * rng.uniform(-1, 1), cubic=True).repeat((1, 1, 2))
    atoms.set_chemical_symbols(rng.choice(elements, size=len(atoms)))
    strain = np.eye(3) + 0.02 * rng.uniform(-1, 1, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(0.08, seed=int(rng.integers(1 << 31)))
    return atoms


def _slab(rng: np.random.Generator, elements: tuple[str, ...]) -> Atoms:
    atoms = fcc111("Cu", size=(2, 2, 3), a=3.6, vacuum=4.0)
    atoms.info.pop("adsorbate_info", None)  # not representable in extxyz
    atoms.set_chemical_symbols(rng.choice(elements, size=len(atoms)))
    atoms.rattle(0.08, seed=int(rng.integers(1 << 31)))
    return atoms


def _label(atoms: Atoms, calculator) -> Atoms:
    atoms.calc = calculator
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if all(atoms.pbc):
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


class EMTPlusMorse:
    """The second level of theory: EMT plus a weak Morse pair potential."""

    def __init__(self) -> None:
        self.emt = EMT()
        self.morse = MorsePotential(epsilon=0.15, r0=2.6, rho0=5.0, rcut1=3.4, rcut2=3.9)

    def label(self, atoms: Atoms) -> dict[str, Any]:
        out = {}
        for calc in (self.emt, self.morse):
            a = atoms.copy()
            a.calc = calc
            parts = {"energy": a.get_potential_energy(), "forces": a.get_forces()}
            if all(a.pbc):
                parts["stress"] = a.get_stress()
            for key, value in parts.items():
                out[key] = out.get(key, 0) + value
        return out


def generate(
    count: int, seed: int, elements: tuple[str, ...] = ("Cu", "Al"), theory: str = "emt"
) -> list[Atoms]:
    """``count`` labelled structures, about one in four a slab."""
    rng = np.random.default_rng(seed)
    frames = []
    other = EMTPlusMorse() if theory == "emt+morse" else None
    for i in range(count):
        atoms = _slab(rng, elements) if i % 4 == 3 else _crystal(rng, elements)
        if other is None:
            frames.append(_label(atoms, EMT()))
        else:
            atoms.calc = SinglePointCalculator(atoms, **other.label(atoms))
            frames.append(atoms)
    return frames


def write_frames(path: Path, frames: list[Atoms]) -> Path:
    write(path, frames, format="extxyz")
    return path


def tiny_config(tmp: Path, heads: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """A config dict for ``load_config``-style building, tiny and fast."""
    config: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(tmp / "run"),
        "seed": 3,
        "dtype": "float64",
        "device": "cpu",
        "num_threads": 1,
        "heads": heads,
        "model": dict(TINY_MODEL),
        "loss": {"energy_weight": 1.0, "forces_weight": 10.0},
        "optimizer": {"lr": 0.01},
        "scheduler": {"name": "exponential", "gamma": 0.98},
        "epochs": 10,
        "batch_size": 4,
        "valid_batch_size": 16,
        "ema_decay": 0.9,
        "progress": False,
    }
    for key, value in options.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
