"""Data statistics that fix a model's references and normalisation before training.

- E0s: isolated-atom reference energies, fitted per head by least squares of total
  energies against element counts, so the network only has to learn the interaction
  energy.
- The average number of neighbours normalises the message sum of the interaction blocks.
- Per head, ``shift`` is the mean interaction energy per atom and ``scale`` either the
  RMS force component or the standard deviation of the interaction energy per atom: the
  network then outputs numbers of order one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crossfield.model.graph import neighbour_list
from crossfield.training.data import Configuration

SCALINGS = ("rms_forces", "std_energy", "none")
SHIFTS = ("mean", "none")


def element_counts(configs: Sequence[Configuration], elements: Sequence[int]) -> np.ndarray:
    """``[n_configs, n_elements]`` atom counts per element of the table."""
    lookup = {int(z): i for i, z in enumerate(elements)}
    counts = np.zeros((len(configs), len(elements)))
    for row, c in enumerate(configs):
        for z, k in zip(*np.unique(c.structure.numbers, return_counts=True)):
            if int(z) not in lookup:
                raise ValueError(
                    f"{c.source}: element {int(z)} is not in the element table {list(elements)}"
                )
            counts[row, lookup[int(z)]] = k
    return counts


def fit_e0s(configs: Sequence[Configuration], elements: Sequence[int]) -> list[float]:
    """Least-squares E0 per element: ``E_c ~ sum_z n_cz E0_z``.

    Elements that appear in no configuration get 0. When the compositions do not
    determine the E0s (e.g. one fixed stoichiometry), the minimum-norm solution is used
    and a warning says so: such E0s still absorb the mean energy, which is what matters
    for training.
    """
    labelled = [c for c in configs if c.energy is not None]
    if not labelled:
        raise ValueError("e0s: cannot fit E0s, no configuration has an energy label")
    counts = element_counts(labelled, elements)
    energies = np.array([c.energy for c in labelled])
    present = counts.sum(axis=0) > 0
    solution, _, rank, _ = np.linalg.lstsq(counts[:, present], energies, rcond=None)
    if rank < int(present.sum()):
        warnings.warn(
            f"e0s: compositions determine only {rank} of {int(present.sum())} E0s; "
            "using the minimum-norm least-squares solution",
            stacklevel=2,
        )
    e0s = np.zeros(len(elements))
    e0s[present] = solution
    return e0s.tolist()


def interaction_energy_per_atom(
    configs: Sequence[Configuration], elements: Sequence[int], e0s: Sequence[float]
) -> np.ndarray:
    """``(E - sum_i E0[z_i]) / n`` for every configuration with an energy."""
    labelled = [c for c in configs if c.energy is not None]
    if not labelled:
        return np.zeros(0)
    counts = element_counts(labelled, elements)
    reference = counts @ np.asarray(e0s, dtype=np.float64)
    energies = np.array([c.energy for c in labelled])
    return (energies - reference) / counts.sum(axis=1)


def average_num_neighbours(configs: Sequence[Configuration], r_max: float) -> float:
    """Mean number of neighbours within ``r_max`` per atom over all configurations."""
    edges = atoms = 0
    for c in configs:
        s = c.structure
        sender, _, _ = neighbour_list(s.positions, s.cell, s.pbc, r_max)
        edges += len(sender)
        atoms += len(s.numbers)
    if atoms == 0:
        raise ValueError("avg_num_neighbors: no atoms in the training data")
    return max(edges / atoms, 1e-3)


@dataclass
class ScaleShift:
    scale: float
    shift: float


def scale_and_shift(
    configs: Sequence[Configuration],
    elements: Sequence[int],
    e0s: Sequence[float],
    scaling: str = "rms_forces",
    shift: str = "mean",
) -> ScaleShift:
    """Per-head scale and shift of the atomic energies (see the module docstring)."""
    if scaling not in SCALINGS:
        raise ValueError(f"statistics.scaling: must be one of {SCALINGS}, got {scaling!r}")
    if shift not in SHIFTS:
        raise ValueError(f"statistics.shift: must be one of {SHIFTS}, got {shift!r}")
    per_atom = interaction_energy_per_atom(configs, elements, e0s)
    mean = float(per_atom.mean()) if (shift == "mean" and per_atom.size) else 0.0
    if scaling == "rms_forces":
        forces = [c.forces for c in configs if c.forces is not None]
        value = float(np.sqrt(np.mean(np.concatenate(forces) ** 2))) if forces else 0.0
    elif scaling == "std_energy":
        value = float(per_atom.std()) if per_atom.size > 1 else 0.0
    else:
        value = 1.0
    if not value > 1e-8:
        warnings.warn(
            f"statistics.scaling: {scaling} is zero on this data; using scale 1", stacklevel=2
        )
        value = 1.0
    return ScaleShift(scale=value, shift=mean)
