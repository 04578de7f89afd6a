"""How much a model's energy jumps when a neighbour crosses the cutoff.

A force field whose energy is discontinuous at r_max cannot conserve energy in MD: every
time a pair crosses the cutoff the total energy steps by the jump. Crossfield builds only
smooth models (``ModelConfig``), so this measurement is for imported models that
reproduce a discontinuous source (``reproduce_cutoff_jump``) and for tests that check
the claim on real weights.

The probe is a dimer of each element pair just inside and just outside r_max: the
difference of the two energies is the jump (for a smooth model it is of the order of the
force times the step, ~1e-12 eV in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ase.data
import numpy as np
import torch

from .graph import Structure, build_batch
from .mace import CrossfieldMACE

STEP = 1e-7  # A either side of r_max; a smooth energy changes by ~|F| * STEP there


@dataclass(frozen=True)
class CutoffJump:
    head: str
    pair: tuple[int, int]  # atomic numbers
    jump: float  # eV: E(r_max - STEP) - E(r_max + STEP)

    def describe(self) -> str:
        a, b = (ase.data.chemical_symbols[z] for z in self.pair)
        return f"{self.jump:+.4g} eV for a {a}-{b} pair on head {self.head}"


def element_pairs(elements: Sequence[int], limit: int | None = None) -> list[tuple[int, int]]:
    """Every unordered pair of ``elements``; an evenly spaced subset beyond ``limit``."""
    pairs = [(a, b) for i, a in enumerate(elements) for b in elements[i:]]
    if limit is not None and len(pairs) > limit:
        pick = np.linspace(0, len(pairs) - 1, limit).round().astype(int)
        pairs = [pairs[i] for i in sorted(set(pick.tolist()))]
    return pairs


def dimer(pair: tuple[int, int], distance: float, head: str) -> Structure:
    positions = np.array([[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])
    return Structure(numbers=np.array(pair, dtype=np.int64), positions=positions, head=head)


def dimer_energies(
    model: CrossfieldMACE, pairs: Sequence[tuple[int, int]], distance: float, head: str
) -> np.ndarray:
    """Energies of one dimer per pair at ``distance``, in one batch, without forces."""
    config = model.config
    device = next(model.buffers()).device
    batch = build_batch(
        [dimer(pair, distance, head) for pair in pairs],
        config.elements,
        config.r_max,
        config.head_names,
        model.dtype,
        device,
    )
    with torch.no_grad():
        energy = model(batch, compute_forces=False)["energy"]
    return energy.double().cpu().numpy()


def cutoff_jumps(
    model: CrossfieldMACE,
    heads: Sequence[str] | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    chunk: int = 512,
) -> list[CutoffJump]:
    """The jump of every (head, pair), largest first."""
    r_max = model.config.r_max
    heads = list(heads or model.config.head_names)
    pairs = list(pairs or element_pairs(model.config.elements))
    jumps = []
    for head in heads:
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            inside = dimer_energies(model, part, r_max - STEP, head)
            outside = dimer_energies(model, part, r_max + STEP, head)
            jumps += [CutoffJump(head, p, float(d)) for p, d in zip(part, inside - outside)]
    return sorted(jumps, key=lambda j: -abs(j.jump))
