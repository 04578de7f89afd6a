"""Physics of the model in float64: symmetries, derivatives, batching, smoothness, heads.

Tolerances: float64 round-off through a few thousand operations leaves ~1e-14 relative;
e3nn's Wigner 3j tables are accurate to ~1e-8 in places, so symmetry checks use 1e-9
absolute on O(1) quantities. Finite differences use a central step h = 1e-4 A with a
truncation error ~h^2 |E'''| ~ 1e-8, hence 1e-6 tolerances on forces and stress.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from crossfield.model import (
    HeadConfig,
    ModelConfig,
    Structure,
    build_model,
    evaluate,
    load_checkpoint,
    save_checkpoint,
)
from crossfield.model.presets import mh1_config

ELEMENTS = [1, 6, 8, 13, 29]
HEADS = ["pbe", "r2scan", "wb97"]


def small_config(**overrides) -> ModelConfig:
    options = dict(
        elements=ELEMENTS,
        heads=[
            HeadConfig(name=h, e0s=[-1.0 - i, -2.0, -3.0, -4.0, -5.0 + i])
            for i, h in enumerate(HEADS)
        ],
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=[3, 2],
        r_max=4.0,
        radial_mlp=[16, 16],
        interaction_first="nonlinear",
        interaction="nonlinear",
        product="agnostic",
        distance_transform="agnesi",
        pair_repulsion=True,
        apply_cutoff=False,
    )
    options.update(overrides)
    return ModelConfig(**options)


def make_model(seed: int = 0, **overrides):
    model = build_model(small_config(**overrides), seed=seed, dtype=torch.float64)
    # Move parameters that start at constants (alpha, beta, LayerNorm) off their defaults,
    # and scale scale/shift per head, so the tests see every term of the energy.
    with torch.no_grad():
        for interaction in model.interactions:
            if hasattr(interaction, "beta"):
                interaction.beta.fill_(0.4)
        model.scale.copy_(torch.tensor([1.0, 2.5, 0.7]))
        model.shift.copy_(torch.tensor([0.1, -0.2, 0.05]))
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.1 * noise)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def crystal(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.numbers[[1, 6]] = [13, 8]
    atoms.rattle(0.15, seed=seed)
    return atoms


def ethanol(seed: int = 0) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def energy(model, atoms: Atoms, head: str = "pbe") -> float:
    return float(
        evaluate(model, [Structure.from_atoms(atoms, head=head)], compute_stress=False)[0]["energy"]
    )


def results(model, atoms: Atoms, head: str = "pbe") -> dict[str, np.ndarray]:
    return evaluate(model, [Structure.from_atoms(atoms, head=head)], compute_stress=any(atoms.pbc))[
        0
    ]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.mark.parametrize("make", [crystal, ethanol])
def test_rotation_and_translation(model, make):
    rng = np.random.default_rng(11)
    atoms = make()
    reference = results(model, atoms, "r2scan")
    rotation = random_rotation(rng)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + rng.normal(size=3)
    if atoms.pbc.any():
        moved.cell = atoms.cell.array @ rotation.T
    got = results(model, moved, "r2scan")
    assert abs(got["energy"] - reference["energy"]) < 1e-9
    np.testing.assert_allclose(got["forces"], reference["forces"] @ rotation.T, atol=1e-9)
    if atoms.pbc.any():
        np.testing.assert_allclose(
            got["stress"], rotation @ reference["stress"] @ rotation.T, atol=1e-10
        )


def test_inversion(model):
    """Energies are O(3)-invariant: MACE's 0e readouts see no handedness."""
    atoms = ethanol()
    mirrored = atoms.copy()
    mirrored.positions = -atoms.positions
    assert abs(energy(model, mirrored) - energy(model, atoms)) < 1e-9


@pytest.mark.parametrize("make", [crystal, ethanol])
def test_permutation(model, make):
    atoms = make()
    order = np.random.default_rng(3).permutation(len(atoms))
    reference = results(model, atoms)
    got = results(model, atoms[order])
    assert abs(got["energy"] - reference["energy"]) < 1e-10
    np.testing.assert_allclose(got["forces"], reference["forces"][order], atol=1e-12)
    np.testing.assert_allclose(got["node_energy"], reference["node_energy"][order], atol=1e-12)


def test_lattice_vector_change(model):
    """The same crystal in another unit-cell basis (unimodular change, atoms wrapped)."""
    atoms = crystal()
    reference = results(model, atoms)
    change = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert round(abs(np.linalg.det(change))) == 1
    other = atoms.copy()
    other.set_cell(change @ atoms.cell.array, scale_atoms=False)
    other.wrap()
    got = results(model, other)
    assert abs(got["energy"] - reference["energy"]) < 1e-9
    np.testing.assert_allclose(got["forces"], reference["forces"], atol=1e-10)
    np.testing.assert_allclose(got["stress"], reference["stress"], atol=1e-10)


@pytest.mark.parametrize("make", [crystal, ethanol])
def test_forces_are_minus_energy_gradient(model, make):
    atoms = make(seed=5)
    forces = results(model, atoms, "wb97")["forces"]
    step = 1e-4
    for atom, axis in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        numeric = -(energy(model, plus, "wb97") - energy(model, minus, "wb97")) / (2 * step)
        assert abs(numeric - forces[atom, axis]) < 1e-6, (atom, axis, numeric, forces[atom, axis])


def test_stress_is_strain_derivative(model):
    atoms = crystal(seed=7)
    stress = results(model, atoms, "r2scan")["stress"]
    volume = atoms.get_volume()
    step = 1e-5
    for i, j in [(0, 0), (1, 2), (2, 1), (2, 2)]:
        values = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * step / 2
            strain[j, i] += sign * step / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            values.append(energy(model, strained, "r2scan"))
        numeric = (values[0] - values[1]) / (2 * step) / volume
        assert abs(numeric - stress[i, j]) < 1e-6, (i, j, numeric, stress[i, j])


def test_batch_equals_single(model):
    slab = fcc111("Cu", (2, 2, 2), vacuum=4.0)
    slab.rattle(0.05, seed=2)
    structures = [
        Structure.from_atoms(crystal(1), head="pbe"),
        Structure.from_atoms(ethanol(2), head="wb97"),
        Structure.from_atoms(slab, head="r2scan"),
        Structure.from_atoms(molecule("H2O"), head="r2scan"),
        Structure.from_atoms(crystal(3), head="wb97"),
    ]
    batched = evaluate(model, structures)
    for structure, together in zip(structures, batched):
        alone = evaluate(model, [structure])[0]
        for key in ("energy", "forces", "stress", "node_energy"):
            np.testing.assert_allclose(together[key], alone[key], rtol=1e-12, atol=1e-12)


def test_energy_continuous_across_cutoff(model):
    """A neighbour crossing r_max changes the energy and force smoothly (to zero)."""
    r_max = model.config.r_max
    energies, forces = [], []
    distances = r_max + np.array([-2e-3, -1e-3, -1e-6, 1e-6, 1e-3])
    for distance in distances:
        dimer = Atoms("CuO", positions=[[0, 0, 0], [distance, 0, 0]])
        result = results(model, dimer)
        energies.append(float(result["energy"]))
        forces.append(result["forces"][1, 0])
    assert abs(energies[2] - energies[3]) < 1e-12
    assert abs(forces[2]) < 1e-10 and forces[3] == 0.0
    assert energies[0] != energies[-1]  # inside the cutoff the neighbour does count


def test_heads_give_different_energies(model):
    atoms = crystal()
    values = {head: energy(model, atoms, head) for head in HEADS}
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_energy_decomposes_into_e0_and_interaction():
    """Scale and shift act per head on the interaction energy, E0 per element and head."""
    model = make_model(seed=2)
    atoms = ethanol()
    base = results(model, atoms, "r2scan")
    with torch.no_grad():
        model.shift[1] += 0.5
    shifted = results(model, atoms, "r2scan")
    assert abs(shifted["energy"] - base["energy"] - 0.5 * len(atoms)) < 1e-10
    np.testing.assert_allclose(shifted["forces"], base["forces"], atol=1e-14)


def test_float32_close_to_float64(model):
    model32 = make_model().float()
    atoms = crystal()
    got = evaluate(model32, [Structure.from_atoms(atoms)])[0]
    reference = results(model, atoms)
    # float32 keeps ~7 digits: energies of O(10) eV to ~1e-5 eV, forces to ~1e-5 eV/A.
    assert abs(got["energy"] - reference["energy"]) < 1e-4
    np.testing.assert_allclose(got["forces"], reference["forces"], atol=1e-4)


@pytest.mark.parametrize(
    "kind",
    [
        dict(interaction_first="residual", interaction="residual", product="element"),
        dict(interaction_first="plain", interaction="residual", product="element"),
        dict(interaction_first="density", interaction="density_residual", product="element"),
        dict(
            interaction_first="nonlinear",
            interaction="nonlinear",
            product="agnostic",
            correlation=[1, 1],
        ),
    ],
)
def test_every_block_kind_is_equivariant_and_conservative(kind):
    model = make_model(seed=4, **kind)
    atoms = crystal(2)
    reference = results(model, atoms)
    rotation = random_rotation(np.random.default_rng(5))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T
    moved.cell = atoms.cell.array @ rotation.T
    got = results(model, moved)
    assert abs(got["energy"] - reference["energy"]) < 1e-9
    np.testing.assert_allclose(got["forces"], reference["forces"] @ rotation.T, atol=1e-9)
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[2, 1] += 1e-4
    minus.positions[2, 1] -= 1e-4
    numeric = -(energy(model, plus) - energy(model, minus)) / 2e-4
    assert abs(numeric - reference["forces"][2, 1]) < 1e-6


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, metadata={"note": "round trip"})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.metadata == {"note": "round trip"}
    atoms = crystal()
    np.testing.assert_array_equal(results(loaded, atoms)["forces"], results(model, atoms)["forces"])
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file behind"


def test_checkpoint_refuses_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a readable Crossfield checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing format marker"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(elements=[]), "elements"),
        (dict(elements=[1, 1, 6, 8, 29]), "elements"),
        (dict(hidden_irreps="8x0e+4x1o"), "hidden_irreps"),
        (dict(hidden_irreps="8x0e+8x1e"), "hidden_irreps"),
        (dict(hidden_irreps="8x0e+8x1o+8x2e+8x3o+8x4e", max_ell=3), "hidden_irreps"),
        (dict(correlation=[4, 3]), "correlation"),
        (dict(correlation=[3]), "correlation"),
        (dict(interaction="attention"), "interaction"),
        (dict(product="sparse"), "product"),
        (dict(r_max=-1.0), "r_max"),
        (dict(distance_transform="soft"), "distance_transform"),
        (dict(readout_mlp_irreps="4x1o"), "readout_mlp_irreps"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"invalid model config: {field}"):
        small_config(**overrides)


def test_head_e0s_must_cover_the_element_table():
    with pytest.raises(ValueError, match=r"heads\[pbe\].e0s"):
        small_config(heads=[HeadConfig(name="pbe", e0s=[0.0])])


def test_unknown_element_and_head_are_reported():
    model = make_model()
    with pytest.raises(ValueError, match=r"structures\[0\].numbers: element 92"):
        evaluate(model, [Structure(numbers=np.array([92]), positions=np.zeros((1, 3)))])
    with pytest.raises(ValueError, match=r"structures\[0\].head: unknown head 'pbe0'"):
        evaluate(model, [Structure.from_atoms(ethanol(), head="pbe0")])


def test_mh1_scaled_down_batch():
    """MH-1 hyperparameters at 64 channels, 6 heads: a 64-atom cell and 32 molecules at once."""
    config = mh1_config([1, 6, 7, 8, 29], channels=64)
    model = build_model(config, seed=0)
    assert model.config.num_heads == 6
    cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 4)
    cell.rattle(0.05, seed=1)
    assert len(cell) == 64
    names = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4"]
    molecules = [molecule(names[i % len(names)]) for i in range(32)]
    heads = config.head_names
    structures = [Structure.from_atoms(cell, head="omat_pbe")] + [
        Structure.from_atoms(m, head=heads[i % len(heads)]) for i, m in enumerate(molecules)
    ]
    out = evaluate(model, structures)
    assert len(out) == 33
    assert out[0]["forces"].shape == (64, 3) and out[0]["stress"].shape == (3, 3)
    assert all(np.isfinite(r["energy"]) and np.isfinite(r["forces"]).all() for r in out)
    assert np.abs(out[0]["stress"]).max() > 0
