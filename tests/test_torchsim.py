"""torch-sim drives Crossfield models in-process and on a server: torch-sim's own interface
validation, agreement with the ASE calculators, and a batched FIRE relaxation through each
adapter compared with ASE's FIRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.optimize import FIRE
from client_support import running_server

from crossfield.model import HeadConfig, ModelConfig, build_model
from crossfield.model.calculator import CrossfieldCalculator

ts = pytest.importorskip("torch_sim", reason="torch-sim-atomistic is not installed")
from torch_sim.models.interface import validate_model_outputs  # noqa: E402

from crossfield.client import RemoteCalculator  # noqa: E402
from crossfield.client.torchsim import RemoteTorchSimModel  # noqa: E402
from crossfield.model.torchsim import CrossfieldTorchSimModel  # noqa: E402

try:  # torch-sim >= 0.4 (Python >= 3.12) ships it; 0.3.0 is the last for Python 3.11
    from torch_sim.testing import assert_model_calculator_consistency
except ImportError:
    from ase.stress import full_3x3_to_voigt_6_stress

    def assert_model_calculator_consistency(model, calculator, sim_state, tol=1e-5):
        """torch-sim's check (torch_sim/testing.py), for releases that lack it."""
        atoms = ts.io.state_to_atoms(sim_state)[0]
        atoms.calc = calculator
        out = model(sim_state)
        close = {"rtol": tol, "atol": tol}
        torch.testing.assert_close(out["energy"].item(), atoms.get_potential_energy(), **close)
        forces = torch.tensor(atoms.get_forces(), dtype=out["forces"].dtype)
        torch.testing.assert_close(out["forces"], forces, **close)
        if "stress" in out:
            stress = torch.tensor(atoms.get_stress(), dtype=out["stress"].dtype)[None]
            voigt = torch.as_tensor(full_3x3_to_voigt_6_stress(out["stress"].numpy()))
            torch.testing.assert_close(voigt, stress, **close)


DEVICE, DTYPE = torch.device("cpu"), torch.float64
ELEMENTS = [1, 8, 14, 26]  # torch-sim validates with silicon and iron crystals


@pytest.fixture(scope="module")
def model():
    n = len(ELEMENTS)
    config = ModelConfig(
        elements=ELEMENTS,
        heads=[
            HeadConfig("pbe", e0s=[-1.0 - i for i in range(n)], scale=0.7),
            HeadConfig("r2scan", e0s=[-2.0 - i for i in range(n)], shift=0.2),
        ],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
        avg_num_neighbors=10.0,
    )
    return build_model(config, seed=4, dtype=DTYPE)


@pytest.fixture(scope="module")
def address(model):
    with running_server(model) as address:
        yield address


def crystals(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    systems = [
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("Fe", "bcc", a=2.87, cubic=True).repeat(2),
    ]
    for atoms in systems:  # sheared, so a cell transposed by mistake changes the answers
        shear = np.eye(3) + np.triu(rng.normal(scale=0.05, size=(3, 3)), k=1)
        atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return systems


@pytest.fixture(scope="module")
def adapters(model, address):
    remote = RemoteTorchSimModel(address, model="small", head="r2scan", dtype=DTYPE)
    yield {
        "in-process": (
            CrossfieldTorchSimModel(model, head="r2scan", dtype=DTYPE),
            CrossfieldCalculator(model, head="r2scan"),
        ),
        "remote": (remote, RemoteCalculator(address, model="small", head="r2scan")),
    }
    remote.close()


@pytest.mark.parametrize("kind", ["in-process", "remote"])
def test_torchsim_validation_and_calculator_consistency(adapters, kind) -> None:
    ts_model, calculator = adapters[kind]
    validate_model_outputs(ts_model, DEVICE, DTYPE)
    for atoms in crystals(seed=1):
        state = ts.io.atoms_to_state([atoms], DEVICE, DTYPE)
        assert_model_calculator_consistency(ts_model, calculator, state)


@pytest.mark.parametrize("kind", ["in-process", "remote"])
def test_heads_and_molecules(adapters, model, kind) -> None:
    """The chosen head answers (not the first), and a molecule's stress is zero."""
    from ase.build import molecule

    ts_model, _ = adapters[kind]
    water = molecule("H2O")
    water.center(vacuum=5.0)
    out = ts_model(ts.io.atoms_to_state([water, water.copy()], DEVICE, DTYPE))
    reference = [
        CrossfieldCalculator(model, head="r2scan"),
        CrossfieldCalculator(model, head="pbe"),
    ]
    water.calc = reference[0]
    assert out["energy"][0].item() == pytest.approx(water.get_potential_energy(), rel=1e-10)
    water.calc = reference[1]
    assert abs(out["energy"][0].item() - water.get_potential_energy()) > 1e-3
    assert torch.count_nonzero(out["stress"]) == 0  # undefined for molecules: zeros
    crystal = ts_model(ts.io.atoms_to_state(crystals()[:1], DEVICE, DTYPE))
    assert torch.count_nonzero(crystal["stress"]) > 0


def test_batched_fire_relaxation_matches_ase(adapters, model) -> None:
    """Both adapters relax two crystals together with torch-sim's FIRE (ASE flavour) to the
    energies that ASE's FIRE reaches one by one with the in-process calculator."""
    fmax = 0.01
    expected = []
    for atoms in crystals(seed=2):
        atoms.calc = CrossfieldCalculator(model, head="r2scan")
        FIRE(atoms, logfile=None).run(fmax=fmax, steps=400)
        assert np.abs(atoms.get_forces()).max() < fmax
        expected.append(atoms.get_potential_energy())
    converged = ts.runners.generate_force_convergence_fn(fmax, include_cell_forces=False)
    relaxed = {}
    for kind in ("in-process", "remote"):
        ts_model, _ = adapters[kind]
        start = ts.io.atoms_to_state(crystals(seed=2), DEVICE, DTYPE)
        initial = ts_model(start)["energy"]
        final = ts.optimize(
            system=start,
            model=ts_model,
            optimizer=ts.optimizers.fire,
            convergence_fn=converged,
            max_steps=400,
        )
        assert bool(converged(final).all()), kind
        energies = ts_model(final)["energy"]
        assert (energies < initial).all() and (initial - energies).sum() > 0.1, kind  # it moved
        # the same minimum: both stop below fmax, a few steps apart (< 1e-4 eV/atom here)
        np.testing.assert_allclose(energies.numpy(), expected, atol=1e-3, err_msg=kind)
        relaxed[kind] = energies.numpy()
    # the remote trajectory is the in-process one: same numbers, same steps
    np.testing.assert_allclose(relaxed["remote"], relaxed["in-process"], rtol=1e-9)
