"""Named architectures: MH-1-like and MP-0-like configurations, and the default model.

``default_model()`` is what ``crossfield serve`` runs with no arguments: the small trained
model shipped beside this file. ``random_model()`` is a deterministic random
initialisation with a wide element table, labelled as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import HeadConfig, ModelConfig
from .mace import CrossfieldMACE, build_model

MH1_HEADS = (
    ("omat_pbe", {"functional": "PBE/PBE+U", "domain": "inorganic crystals"}),
    ("matpes_r2scan", {"functional": "r2SCAN", "domain": "inorganic crystals"}),
    ("mp_pbe_refit_add", {"functional": "PBE", "domain": "inorganic crystals"}),
    ("spice_wB97M", {"functional": "wB97M-D3(BJ)", "domain": "molecules"}),
    ("oc20_usemppbe", {"functional": "PBE", "domain": "surfaces + adsorbates"}),
    ("omol", {"functional": "wB97M-V", "domain": "molecules"}),
)

DEFAULT_ELEMENTS = (1, 6, 7, 8, 9, 13, 14, 15, 16, 17, 26, 28, 29, 46, 47, 78, 79)


def mh1_config(
    elements: Sequence[int],
    heads: Sequence[tuple[str, dict]] = MH1_HEADS,
    channels: int = 64,
    edge_channels: int | None = None,
    r_max: float = 6.0,
) -> ModelConfig:
    """MACE-MH-1's architecture (SCIENCE.md section 6) at a chosen width."""
    return ModelConfig(
        elements=list(elements),
        heads=[
            HeadConfig(name=name, e0s=[0.0] * len(elements), level_of_theory=dict(level))
            for name, level in heads
        ],
        r_max=r_max,
        num_bessel=10,
        cutoff_p=5,
        distance_transform="agnesi",
        pair_repulsion=True,
        apply_cutoff=False,
        max_ell=3,
        hidden_irreps=f"{channels}x0e+{channels}x1o",
        edge_irreps=f"{edge_channels}x0e+{edge_channels}x1o" if edge_channels else None,
        num_layers=2,
        correlation=[3, 3],
        interaction_first="nonlinear",
        interaction="nonlinear",
        product="agnostic",
        radial_mlp=[64, 64, 64],
        readout_mlp_irreps="16x0e",
    )


def mp0_config(elements: Sequence[int], channels: int = 64, r_max: float = 6.0) -> ModelConfig:
    """MACE-MP-0 "medium"-like: residual blocks and per-element product weights."""
    return ModelConfig(
        elements=list(elements),
        heads=[
            HeadConfig(name="pbe", e0s=[0.0] * len(elements), level_of_theory={"functional": "PBE"})
        ],
        r_max=r_max,
        num_bessel=10,
        hidden_irreps=f"{channels}x0e+{channels}x1o",
        interaction_first="residual",
        interaction="residual",
        product="element",
    )


DEFAULT_CHECKPOINT = Path(__file__).with_name("default.pt")


def default_model(dtype: torch.dtype = torch.float32) -> CrossfieldMACE:
    """The model ``crossfield serve`` runs with no arguments.

    A small MH-1-style model (16 channels, 27k parameters) shipped with the package,
    trained by ``python -m crossfield.training.study`` on the data under data/:
    pretraining on GFN2-xTB molecules, then replay fine-tuning onto GFN1-xTB (molecules and
    slabs) and EMT (metals and surfaces). Its errors are in the README; it is a demonstration
    model, not a production force field.
    """
    model = load_checkpoint(DEFAULT_CHECKPOINT, dtype=dtype)
    model.metadata = {**model.metadata, "name": "default", "version": "1", "trained": True}
    return model


def random_model(dtype: torch.dtype = torch.float32) -> CrossfieldMACE:
    """A small MH-1-style model with three heads and *random* weights (seed 0), for tests
    and benchmarks that need a wide element table; labelled so nobody mistakes it."""
    heads = [
        (name, {**level, "warning": "random-init model: numbers are not physical"})
        for name, level in (MH1_HEADS[0], MH1_HEADS[1], MH1_HEADS[3])
    ]
    config = mh1_config(DEFAULT_ELEMENTS, heads=heads, channels=16, r_max=5.0)
    model = build_model(config, seed=0, dtype=dtype).eval()
    model.metadata = {"name": "random", "version": "random-init", "trained": False}
    return model
