"""Build random-weight mace-torch models and evaluate them with mace-torch's own pipeline.

The reference side of the agreement tests and of bench/model_speed.py. mace must be
imported before e3nn (it sets the weights-only loading switch e3nn 0.4.4 needs).
"""

from __future__ import annotations

import mace  # noqa: F401  (import order: before e3nn)
import numpy as np
import torch
from e3nn import o3
from mace import data as mace_data
from mace.modules import blocks, models
from mace.tools import torch_geometric, utils

BLOCKS = {
    "plain": blocks.RealAgnosticInteractionBlock,
    "residual": blocks.RealAgnosticResidualInteractionBlock,
    "density": blocks.RealAgnosticDensityInteractionBlock,
    "density_residual": blocks.RealAgnosticDensityResidualInteractionBlock,
    "nonlinear": blocks.RealAgnosticResidualNonLinearInteractionBlock,
}


def make_mace_model(
    elements: list[int],
    heads: list[str],
    seed: int = 0,
    hidden: str = "8x0e+8x1o",
    max_ell: int = 3,
    correlation=3,
    num_layers: int = 2,
    first: str = "residual",
    interaction: str = "residual",
    agnostic: bool = False,
    agnesi: bool = False,
    zbl: bool = False,
    apply_cutoff: bool = True,
    last_readout_only: bool = False,
    scale_shift: bool = True,
    edge_irreps: str | None = None,
    r_max: float = 4.5,
    radial_mlp=(16, 16),
    mlp_irreps: str = "4x0e",
    dtype: torch.dtype = torch.float64,
) -> torch.nn.Module:
    """A mace-torch model with random weights (including random E0s, scales, shifts)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        kwargs = dict(
            r_max=r_max,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=max_ell,
            interaction_cls=BLOCKS[interaction],
            interaction_cls_first=BLOCKS[first],
            num_interactions=num_layers,
            num_elements=len(elements),
            hidden_irreps=o3.Irreps(hidden),
            MLP_irreps=o3.Irreps(mlp_irreps),
            atomic_energies=rng.normal(-3.0, 1.0, size=(len(heads), len(elements))),
            avg_num_neighbors=7.3,
            atomic_numbers=elements,
            correlation=correlation,
            gate=torch.nn.functional.silu,
            pair_repulsion=zbl,
            distance_transform="Agnesi" if agnesi else "None",
            use_agnostic_product=agnostic,
            use_last_readout_only=last_readout_only,
            heads=heads,
            radial_MLP=list(radial_mlp),
            apply_cutoff=apply_cutoff,
            edge_irreps=o3.Irreps(edge_irreps) if edge_irreps else None,
        )
        if scale_shift:
            model = models.ScaleShiftMACE(
                atomic_inter_scale=list(rng.uniform(0.5, 2.0, len(heads))),
                atomic_inter_shift=list(rng.normal(0.0, 0.3, len(heads))),
                **kwargs,
            )
        else:
            model = models.MACE(**kwargs)
        # Randomise the parameters that initialise to constants, so every one is tested.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(("alpha", "beta")) or ".net.1." in name or ".net.4." in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
                if name.endswith(("source_embedding.weight", "target_embedding.weight")):
                    parameter.normal_()
        return model.eval()
    finally:
        torch.set_default_dtype(previous)


def evaluate_mace(
    model, atoms_list, heads: list[str], head_per_structure: list[str], compute_stress=True
):
    """Energies, forces and stress from mace-torch for a list of ASE Atoms."""
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    r_max = float(model.r_max)
    data = []
    dtype = next(model.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # AtomicData stores positions in the default dtype
    try:
        for atoms, head in zip(atoms_list, head_per_structure):
            config = mace_data.config_from_atoms(atoms, head_name=head)
            config.head = head
            data.append(
                mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=r_max, heads=heads)
            )
    finally:
        torch.set_default_dtype(previous)
    loader = torch_geometric.dataloader.DataLoader(data, batch_size=len(data), shuffle=False)
    batch = next(iter(loader)).to_dict()
    for key in ("positions", "cell", "shifts", "unit_shifts", "node_attrs"):
        batch[key] = batch[key].to(dtype)
    out = model(batch, compute_stress=compute_stress, training=False)
    return {
        k: out[k].detach() for k in ("energy", "forces", "stress") if out.get(k) is not None
    }, batch


def mace_virials(model, atoms_list, heads: list[str], head: str) -> np.ndarray:
    """mace-torch's virials (-dE/d strain), independent of the cell volume."""
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    dtype = next(model.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data = []
        for atoms in atoms_list:
            config = mace_data.config_from_atoms(atoms, head_name=head)
            config.head = head
            data.append(
                mace_data.AtomicData.from_config(
                    config, z_table=z_table, cutoff=float(model.r_max), heads=heads
                )
            )
    finally:
        torch.set_default_dtype(previous)
    batch = next(iter(torch_geometric.dataloader.DataLoader(data, batch_size=len(data)))).to_dict()
    out = model(batch, compute_virials=True, training=False)
    return out["virials"].detach().numpy()
