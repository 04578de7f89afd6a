"""Tiny models and mixed batches for the backend tests.

Two architectures cover both product paths: the MH-1 block with the element-agnostic
product (one compiled graph end to end) and the MP-0 residual block with per-element
weights (the product runs eagerly between compiled graphs). Parameters are perturbed off
their initial constants (alpha, beta, LayerNorm, scale/shift) so every term of the energy
is seen. Batches mix periodic crystals, a slab and molecules with all three heads.
"""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk, fcc111, molecule

from crossfield.model import (
    CrossfieldMACE,
    GraphBatch,
    HeadConfig,
    ModelConfig,
    Structure,
    build_batch,
    build_model,
)

ELEMENTS = [1, 6, 8, 13, 29]
HEADS = ["pbe", "r2scan", "wb97"]
MOLECULES = ["H2O", "CH4", "CH3OH", "C2H6", "CO2", "C2H4", "HCOOH", "CH3CHO"]


def tiny_model(product: str = "agnostic", dtype: torch.dtype = torch.float64) -> CrossfieldMACE:
    interaction = "nonlinear" if product == "agnostic" else "residual"
    config = ModelConfig(
        elements=ELEMENTS,
        heads=[
            HeadConfig(name=h, e0s=[-1.0 - i, -2.0, -3.0, -4.0, -5.0 + i], scale=1.0 + i)
            for i, h in enumerate(HEADS)
        ],
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=[2, 2],
        r_max=4.0,
        radial_mlp=[16, 16],
        interaction_first=interaction,
        interaction=interaction,
        product=product,
        distance_transform="agnesi" if product == "agnostic" else "none",
        pair_repulsion=product == "agnostic",
        apply_cutoff=product != "agnostic",
    )
    model = build_model(config, seed=0).to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for interaction_block in model.interactions:
            if hasattr(interaction_block, "beta"):
                interaction_block.beta.fill_(0.4)
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(0.1 * noise.to(dtype))
    return model.eval()


def structure_pool(seed: int = 0) -> list[Structure]:
    """Crystals (one with a cell smaller than the cutoff), a slab and molecules."""
    rng = np.random.default_rng(seed)
    pool = []
    for index, name in enumerate(MOLECULES):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=seed + index)
        pool.append(Structure.from_atoms(atoms, head=HEADS[index % 3]))
    copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    copper.numbers[[1, 6]] = [13, 8]
    copper.rattle(0.1, seed=seed)
    pool.append(Structure.from_atoms(copper, head="r2scan"))
    aluminium = bulk("Al", "fcc", a=4.05)
    aluminium.rattle(0.05, seed=seed + 1)
    pool.append(Structure.from_atoms(aluminium, head="pbe"))
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    slab.rattle(0.05, seed=seed + 2)
    pool.append(Structure.from_atoms(slab, head="wb97"))
    order = rng.permutation(len(pool))
    return [pool[i] for i in order]


def mixed_batches(model: CrossfieldMACE, sizes: list[int], seed: int = 0) -> list[GraphBatch]:
    """One batch per size, drawn cyclically from the pool, so atom and edge counts vary."""
    pool = structure_pool(seed)
    config = model.config
    batches = []
    start = 0
    for size in sizes:
        chosen = [pool[(start + k) % len(pool)] for k in range(size)]
        start += size
        batches.append(
            build_batch(chosen, config.elements, config.r_max, config.head_names, model.dtype)
        )
    return batches


def assert_matches(got: dict, want: dict, relative: float, names=None) -> None:
    """Every output within ``relative`` of the largest magnitude of that output."""
    for name in names or want:
        scale = max(want[name].abs().max().item(), 1e-12)
        error = (got[name] - want[name]).abs().max().item()
        assert error <= relative * scale, f"{name}: error {error:.3g} vs scale {scale:.3g}"
