"""The shipped default model is fit for simulation: smooth, energy-conserving, and right
about the geometries its heads' levels of theory give.

These run the trained weights users get (not an initialisation), through the same code
as ``bench/nve_drift.py`` and ``bench/reference_geometries.py``.

NVE bounds come from the integrator, not from the model: velocity Verlet conserves a
shadow energy within O(dt^2) of the true one, so the energy error is a bounded
oscillation whose amplitude falls by 4 when dt halves (from the same start the two
trajectories stay close over these few hundred fs), and whose straight-line trend over a
run is smaller than that oscillation. A jump at the cutoff breaks both: each crossing
adds a step that does not depend on dt. Through a float32 server the bound adds what
float32 can contribute: the rounding of the total energy and the work done by the
measured float32 force error along the path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from bench_support import load_bench

from crossfield.model.presets import default_model
from crossfield.training.default_model import SMOOTH, largest_relative_jump

nve = load_bench("nve_drift")
geometries = load_bench("reference_geometries")

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def model64():
    return default_model(torch.float64)


def test_no_jump_at_the_cutoff_on_any_head_and_element_pair(model64):
    jump, where = largest_relative_jump(model64)
    assert jump < SMOOTH, where


def amplitude(energies: np.ndarray) -> float:
    return float(np.abs(energies - energies[0]).max())


def trend(energies: np.ndarray) -> float:
    """The change over the run of a straight line fitted to the energies."""
    steps = np.arange(len(energies))
    slope = np.polyfit(steps, energies, 1)[0]
    return float(abs(slope) * (len(energies) - 1))


@pytest.mark.parametrize(
    ("system", "steps"), [(nve.SYSTEMS[0], 160), (nve.SYSTEMS[1], 60)], ids=lambda s: str(s)
)
def test_nve_in_process_float64_has_only_verlet_error(system, steps):
    calculator = nve.in_process("float64", system.head)
    atoms = system.atoms()
    coarse = nve.run_nve(atoms, calculator, system.timestep_fs, steps, system.temperature_k)
    fine = nve.run_nve(atoms, calculator, system.timestep_fs / 2, 2 * steps, system.temperature_k)
    ratio = amplitude(coarse) / amplitude(fine)
    assert 2.5 < ratio < 6.0, f"energy error does not scale as dt^2: ratio {ratio:.2f}"
    assert trend(coarse) < amplitude(coarse), (trend(coarse), amplitude(coarse))


def test_nve_through_a_float32_server_within_float32_bounds(model64):
    system = nve.SYSTEMS[1]  # fcc Cu: a neighbour shell sits at the cutoff
    steps = 60
    atoms = system.atoms()
    reference = nve.run_nve(
        atoms, nve.in_process("float64", system.head), system.timestep_fs, steps, 300.0
    )
    with nve.served("float32") as address:
        remote = nve.remote(address, system.head)
        served = nve.run_nve(atoms, remote, system.timestep_fs, steps, 300.0)
        probe = atoms.copy()
        probe.calc = remote
        forces32, energies32 = probe.get_forces(), probe.get_potential_energies()
    probe.calc = nve.in_process("float64", system.head)
    force_error = float(np.abs(probe.get_forces() - forces32).max())
    # float32 rounding of the summed energy, at the start and at any later step
    rounding = 2 * len(atoms) * FLOAT32_EPS * float(np.abs(energies32).sum())
    # work of the float32 force error along the path, per step <= |dF|max sum_i |v_i| dt,
    # and sum_i |v_i| <= sqrt(N 2 KE / m); the run starts at the lattice (the potential
    # minimum), so KE never exceeds its start value (plus the tiny Verlet error)
    kinetic = reference[0] - probe.get_potential_energy()
    speeds = np.sqrt(len(atoms) * 2 * kinetic / atoms.get_masses().min())
    work = steps * system.timestep_fs * units.fs * force_error * speeds
    # the float64 run's Verlet amplitude; the float32 trajectory drifts apart a little
    # (its shadow-energy oscillation is the same size but not the same curve): twice it
    bound = 2 * amplitude(reference) + rounding + work
    assert amplitude(served) < bound, (amplitude(served), amplitude(reference), rounding, work)


@pytest.mark.parametrize(
    ("head", "name"),
    [("gfn2_xtb", "H2O"), ("gfn2_xtb", "NH3"), ("gfn2_xtb", "CH3OH"), ("gfn1_xtb", "H2O")],
)
def test_relaxed_molecule_matches_its_level_of_theory(head, name):
    errors = geometries.compare_molecule(name, head)
    assert errors["bond_a"] < 0.02, errors
    assert errors["angle_deg"] < 5.0, errors


@pytest.mark.parametrize("symbol", ["Cu", "Pt", "Al"])
def test_lattice_constant_matches_emt(symbol):
    row = geometries.compare_metal(symbol)
    assert abs(row["relative"]) < 0.01, row
