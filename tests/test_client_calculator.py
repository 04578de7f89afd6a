"""RemoteCalculator against a real server: MD, relaxations and NEB give the same numbers as
the same model in-process, and server errors arrive as clear Python exceptions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.mep import NEB
from ase.optimize import BFGS, FIRE
from client_support import copper_crystal, free_port, running_server, small_model

from crossfield.client import (
    Client,
    DeadlineExceededError,
    InvalidStructureError,
    ModelNotFoundError,
    RemoteCalculator,
    RetryPolicy,
    ServerBusyError,
    ServerUnavailableError,
)
from crossfield.model.calculator import CrossfieldCalculator


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def address(model):
    with running_server(model) as address:
        yield address


@pytest.fixture()
def remote(address):
    with RemoteCalculator(address, model="small", head="pbe") as calculator:
        yield calculator


def test_single_point_matches_in_process(model, remote) -> None:
    atoms = copper_crystal()
    values = []
    for calculator in (remote, CrossfieldCalculator(model, head="pbe")):
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        per_atom = atoms.get_potential_energies()
        values.append((energy, atoms.get_forces(), atoms.get_stress(), per_atom))
        assert atoms.get_potential_energies().sum() == pytest.approx(energy, rel=1e-12)
    for got, want in zip(*values):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    answer = remote.last_result
    assert (answer.model, answer.version, answer.head) == ("small", "1", "pbe")


def test_heads_give_different_energies(address, model) -> None:
    atoms = molecule("CH4")
    energies = {}
    for head in ("pbe", "r2scan"):
        atoms.calc = RemoteCalculator(address, head=head)
        energies[head] = atoms.get_potential_energy()
        atoms.calc = CrossfieldCalculator(model, head=head)
        assert energies[head] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    assert abs(energies["pbe"] - energies["r2scan"]) > 1.0


def _nve(calculator, steps: int) -> tuple[np.ndarray, np.ndarray]:
    atoms = copper_crystal()
    MaxwellBoltzmannDistribution(atoms, temperature_K=800, rng=np.random.default_rng(0))
    Stationary(atoms)
    atoms.calc = calculator
    energies = []
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dynamics.attach(
        lambda: energies.append((atoms.get_potential_energy(), atoms.get_kinetic_energy()))
    )
    dynamics.run(steps)
    return atoms.positions.copy(), np.array(energies)


@pytest.mark.filterwarnings("ignore:Use thermalize_momenta")
def test_nve_through_the_server_follows_the_in_process_trajectory(model, remote) -> None:
    positions, energies = _nve(remote, 200)
    reference_positions, reference_energies = _nve(CrossfieldCalculator(model, head="pbe"), 200)
    np.testing.assert_allclose(positions, reference_positions, rtol=0, atol=1e-8)
    np.testing.assert_allclose(energies, reference_energies, rtol=0, atol=1e-8)
    total, potential = energies.sum(axis=1), energies[:, 0]
    assert np.ptp(potential) > 1e-3  # the atoms really moved
    assert np.ptp(total) < 1e-2 * np.ptp(potential)  # and the total energy is conserved
    assert np.ptp(total) == pytest.approx(np.ptp(reference_energies.sum(axis=1)), abs=1e-8)


def test_langevin_with_the_same_seed_matches_in_process(model, remote) -> None:
    runs = []
    for calculator in (remote, CrossfieldCalculator(model, head="pbe")):
        atoms = copper_crystal()
        atoms.calc = calculator
        Langevin(
            atoms,
            2 * units.fs,
            temperature_K=500,
            friction=0.02,
            fixcm=False,
            rng=np.random.default_rng(3),
        ).run(20)
        runs.append(atoms.positions.copy())
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-9)


def test_bfgs_cell_relaxation_converges(model, remote) -> None:
    relaxed = []
    for calculator in (remote, CrossfieldCalculator(model, head="pbe")):
        atoms = copper_crystal((1, 1, 1))
        atoms.calc = calculator
        optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
        assert optimizer.run(fmax=0.01, steps=200)
        assert np.abs(atoms.get_stress()).max() < 0.01
        relaxed.append((optimizer.nsteps, atoms.get_volume(), atoms.get_potential_energy()))
    assert relaxed[0][0] == relaxed[1][0]
    np.testing.assert_allclose(relaxed[0][1:], relaxed[1][1:], rtol=1e-8)
    assert relaxed[0][1] != pytest.approx(copper_crystal((1, 1, 1)).get_volume())  # the cell moved


def test_fire_and_neb_images_share_one_client(model, address) -> None:
    initial = molecule("NH3")
    final = initial.copy()
    final.positions[1:, 2] *= -1  # the umbrella inversion of ammonia
    with Client(address, head="pbe") as client:
        images = [initial] + [initial.copy() for _ in range(3)] + [final]
        neb = NEB(images, method="improvedtangent")
        neb.interpolate()
        for image in images:
            image.calc = RemoteCalculator(client)
        FIRE(neb, logfile=None).run(fmax=0.05, steps=10)
        remote = [image.get_potential_energy() for image in images]
    for image in images:
        image.calc = CrossfieldCalculator(model, head="pbe")
    local = [image.get_potential_energy() for image in images]
    np.testing.assert_allclose(remote, local, rtol=1e-10)


def test_unknown_element_model_and_head_raise_clear_errors(address) -> None:
    uranium = molecule("H2O")
    uranium.numbers[0] = 92
    uranium.calc = RemoteCalculator(address)
    with pytest.raises(InvalidStructureError, match="92") as caught:
        uranium.get_potential_energy()
    assert caught.value.code == "INVALID_ARGUMENT" and isinstance(caught.value, ValueError)
    water = molecule("H2O")
    water.calc = RemoteCalculator(address, model="no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        water.get_potential_energy()
    water.calc = RemoteCalculator(address, head="ccsd")
    with pytest.raises(ModelNotFoundError, match="ccsd"):
        water.get_potential_energy()
    water.calc = RemoteCalculator(address)
    with pytest.raises(PropertyNotImplementedError, match="stress"):
        water.get_stress()


def test_unreachable_server_is_waited_for_until_the_deadline_then_raises() -> None:
    policy = RetryPolicy(attempts=4, initial_backoff=0.1, max_backoff=1.0)
    atoms = molecule("H2O")
    atoms.calc = RemoteCalculator(f"127.0.0.1:{free_port()}", retries=policy, timeout=1.5)
    started = time.perf_counter()
    with pytest.raises(ServerUnavailableError) as caught:
        atoms.get_potential_energy()
    assert time.perf_counter() - started >= 1.5  # waited for a server (wait for ready)
    assert isinstance(caught.value, ConnectionError)
    assert "Connection refused" in str(caught.value)  # gRPC's reason, for the user


def test_deadline_is_enforced(address) -> None:
    atoms = copper_crystal((2, 2, 2))
    atoms.calc = RemoteCalculator(address, timeout=1e-4)
    with pytest.raises(DeadlineExceededError):
        atoms.get_forces()


def test_full_queue_raises_server_busy_once_retries_are_spent(model) -> None:
    # retries=1: no retry (test_client_failover checks that a full queue is retried)
    with (
        running_server(model, max_delay=0.0, max_queue=1) as address,
        Client(address, retries=1) as client,
    ):
        atoms = copper_crystal((2, 2, 2))
        errors = []

        def hammer() -> None:
            try:
                client.compute(atoms)
            except ServerBusyError as err:
                errors.append(err)

        threads = [threading.Thread(target=hammer) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors and errors[0].code == "RESOURCE_EXHAUSTED"
