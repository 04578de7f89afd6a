"""The energy is smooth where neighbours cross a switch radius, with *large* weights.

A model at its initialisation cannot show a cutoff jump: its element embeddings start at
~1e-3, so the unenveloped radial network of a non-linear block is nearly zero at r_max
anyway. Every parameter here is drawn from N(0, 1) instead (the learnable normaliser
``beta rho + alpha`` is kept positive, as training keeps it: a zero denominator is a pole,
not a jump), for every interaction kind, both envelope placements, with and without the
Agnesi transform and ZBL.

Tolerances (float64): a pair STEP = 1e-7 A either side of r_max. For a smooth energy the
two sides differ by ~|F| * 2 STEP, and the envelope (zero with two derivatives at r_max)
makes |F| there ~ E'' (STEP / r_max)^2 ~ 1e-15 of the energy scale; round-off in sums of
O(scale) terms is ~1e-14 of it. 1e-9 of the scale is far above both and far below any
real jump (a discontinuous model jumps by 1e-3 to 1 of its scale, checked below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.data import covalent_radii

from crossfield.model import HeadConfig, ModelConfig, Structure, build_model, evaluate
from crossfield.model.config import INTERACTION_KINDS
from crossfield.model.radial import ZBLRepulsion
from crossfield.model.smoothness import STEP, cutoff_jumps, dimer_energies, element_pairs

ELEMENTS = [1, 6, 8, 29, 55]  # Cs-Cs covalent radii add up to 4.88 A, beyond r_max
R_MAX = 4.5
RELATIVE = 1e-9


def large_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    options = dict(
        elements=ELEMENTS,
        heads=[
            HeadConfig(name=name, e0s=[-1.0 - i] * len(ELEMENTS), scale=1.0 + i, shift=0.1 * i)
            for i, name in enumerate(("a", "b"))
        ],
        hidden_irreps="4x0e+4x1o",
        max_ell=2,
        correlation=[3, 2],
        r_max=R_MAX,
        radial_mlp=[8, 8],
        interaction_first=kind,
        interaction=kind,
        product="agnostic",
        distance_transform="agnesi",
        pair_repulsion=True,
        apply_cutoff=True,
    )
    options.update(overrides)
    model = build_model(ModelConfig(**options), seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
            if name.endswith(("alpha", "beta")):
                parameter.abs_().add_(1.0 if name.endswith("alpha") else 0.0)
    return model.eval()


def energy_scale(model, pairs) -> float:
    """How much the pair energies vary inside the cutoff: what a jump is measured against."""
    head = model.config.head_names[0]
    inside = dimer_energies(model, pairs, 0.5 * R_MAX, head)
    outside = dimer_energies(model, pairs, R_MAX + STEP, head)
    return float(np.abs(inside - outside).max())


def largest_jump(model) -> tuple[float, float]:
    pairs = element_pairs(model.config.elements)
    worst = cutoff_jumps(model, pairs=pairs)[0]
    return abs(worst.jump), energy_scale(model, pairs)


@pytest.mark.parametrize("apply_cutoff", [True, False])
@pytest.mark.parametrize("kind", INTERACTION_KINDS)
def test_energy_continuous_at_r_max_for_every_block_kind(kind, apply_cutoff):
    for transform in ("agnesi", "none"):
        model = large_model(kind, apply_cutoff=apply_cutoff, distance_transform=transform)
        jump, scale = largest_jump(model)
        assert scale > 1e-4, "the pair energies must vary for the check to mean anything"
        assert jump < RELATIVE * scale, (kind, apply_cutoff, transform, jump, scale)


def test_the_check_sees_a_discontinuous_model():
    """mace-torch's semantics (reproduced for imports) jump: the same check catches it."""
    model = large_model("nonlinear", reproduce_cutoff_jump=True)
    jump, scale = largest_jump(model)
    assert jump > 1e-3 * scale, (jump, scale)


def test_zbl_switch_capped_at_r_max():
    """Cs-Cs would switch ZBL off at 4.88 A, beyond the cutoff: capped, it is smooth.

    (The screened repulsion of Cs-Cs at 4.5 A is ~1e-11 eV, so the jump it caused was
    tiny; the cap matters for the principle and for larger cutoff-to-radius ratios.)
    """
    r = torch.tensor([[R_MAX - STEP]], dtype=torch.float64)
    cs = torch.tensor([55])
    receiver = torch.tensor([0])
    capped = ZBLRepulsion(5, r_max=R_MAX).double()(r, cs, cs, receiver, 1)
    uncapped = ZBLRepulsion(5).double()(r, cs, cs, receiver, 1)
    assert float(uncapped) > 0
    assert abs(float(capped)) < RELATIVE * float(uncapped)


def forces_on(model, numbers, positions) -> tuple[float, np.ndarray]:
    structure = Structure(np.array(numbers), np.asarray(positions, dtype=float), head="b")
    result = evaluate(model, [structure], compute_stress=False)[0]
    return float(result["energy"]), result["forces"]


@pytest.mark.parametrize("kind", ["nonlinear", "density_residual"])
def test_many_body_energy_and_forces_continuous_at_r_max(kind):
    """A third atom crosses the cutoff of one atom that already has a bonded neighbour,
    so the crossing enters through the product basis (many-body), not only a pair."""
    model = large_model(kind, apply_cutoff=False)
    numbers = [8, 1, 29]
    sides = []
    for distance in (R_MAX - STEP, R_MAX + STEP):
        positions = [[0.0, 0.0, 0.0], [0.97, 0.0, 0.0], [-distance, 0.0, 0.0]]
        sides.append(forces_on(model, numbers, positions))
    near = forces_on(model, numbers, [[0.0, 0.0, 0.0], [0.97, 0.0, 0.0], [-0.6 * R_MAX, 0, 0]])
    scale = abs(near[0] - sides[1][0])
    force_scale = float(np.abs(near[1]).max())
    assert abs(sides[0][0] - sides[1][0]) < RELATIVE * scale
    # the crossing atom's force goes to zero at r_max (first derivative of the envelope)
    assert abs(sides[0][1][2]).max() < RELATIVE * force_scale
    assert np.abs(sides[0][1] - sides[1][1]).max() < RELATIVE * force_scale


def test_energy_and_forces_continuous_at_the_zbl_switch():
    """Inside the cutoff ZBL switches off at the covalent radii sum: smooth there too."""
    model = large_model("nonlinear", apply_cutoff=False)
    for pair in [(1, 8), (8, 29), (6, 6)]:
        switch = covalent_radii[pair[0]] + covalent_radii[pair[1]]
        (before, f_before), (after, f_after) = (
            forces_on(model, list(pair), [[0, 0, 0], [r, 0, 0]])
            for r in (switch - STEP, switch + STEP)
        )
        near, f_near = forces_on(model, list(pair), [[0, 0, 0], [0.7 * switch, 0, 0]])
        # smooth: the step changes E by ~|F| 2 STEP and F by ~|F'| 2 STEP
        assert abs(before - after) < 1e-5 * (abs(near - after) + np.abs(f_near).max())
        assert np.abs(f_before - f_after).max() < 1e-5 * np.abs(f_near).max()


def test_format_1_checkpoint_loads_as_trained_and_says_it_jumps(tmp_path, caplog):
    """Weights trained under format 1's semantics keep giving the numbers they were trained
    to give (no silent change of meaning); the jump is reported."""
    from crossfield.model import load_checkpoint, save_checkpoint

    old = large_model("nonlinear", reproduce_cutoff_jump=True)
    save_checkpoint(old, tmp_path / "v2.pt")
    payload = torch.load(tmp_path / "v2.pt", weights_only=True)
    payload["format_version"] = 1
    del payload["config"]["reproduce_cutoff_jump"]
    torch.save(payload, tmp_path / "v1.pt")
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(tmp_path / "v1.pt", dtype=torch.float64)
    assert loaded.config.reproduce_cutoff_jump
    assert "discontinuous at its cutoff" in caplog.text
    pairs = element_pairs(ELEMENTS)
    np.testing.assert_array_equal(
        dimer_energies(loaded, pairs, 4.0, "a"), dimer_energies(old, pairs, 4.0, "a")
    )


def test_training_refuses_a_discontinuous_architecture():
    from crossfield.training.config import load_config

    with pytest.raises(ValueError, match="model.reproduce_cutoff_jump"):
        load_config(
            overrides={
                "head.train_file": "x.xyz",
                "model.reproduce_cutoff_jump": True,
            }
        )


def test_fine_tuning_a_discontinuous_source_gives_a_smooth_model():
    """Surgery copies the weights of an imported discontinuous model into a smooth one."""
    from crossfield.training.surgery import transplant

    source = large_model("nonlinear", reproduce_cutoff_jump=True)
    smooth = ModelConfig.from_dict({**source.config.to_dict(), "reproduce_cutoff_jump": False})
    model = transplant(source, smooth, ["a", "b"]).eval()
    jump, scale = largest_jump(model)
    assert jump < RELATIVE * scale
