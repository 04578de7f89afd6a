"""The study's report: statements follow the numbers, level gaps measure the references."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from crossfield.training.datasets.pipeline import extxyz_gz
from crossfield.training.study import ALL_SETS, DIVERSE_SET, NEW_SETS, PRETRAIN_SET
from crossfield.training.study_report import findings, level_gaps, render


def entry(forces: float, energy: float = 10.0, cross: bool = False) -> dict:
    return {
        "head": "x",
        "cross_level": cross,
        "configurations": 5,
        "of": 5,
        "forces_rmse_mev_per_a": forces,
        "energy_rmse_mev_per_atom": energy,
    }


def results(kept: float, scratch: float) -> dict:
    new = {name: entry(100.0) for name in NEW_SETS}
    return {
        "foundation": {PRETRAIN_SET: entry(100.0)},
        "replay": {PRETRAIN_SET: entry(kept), **new},
        "naive": {PRETRAIN_SET: entry(300.0, cross=True), **new},
        "scratch": {PRETRAIN_SET: None, **{n: entry(scratch) for n in NEW_SETS}},
    }


def architecture(residual: float, nonlinear: float) -> dict:
    return {
        "set": DIVERSE_SET,
        "params": {"arch_residual": 1000, "arch_nonlinear": 1010},
        "arch_residual": entry(residual, residual),
        "arch_nonlinear": entry(nonlinear, nonlinear),
    }


def test_findings_follow_the_numbers():
    gaps = {f"{PRETRAIN_SET} vs {NEW_SETS[0]}": {"forces_rmse_mev_per_a": 280.0}}
    lost = findings(results(104.0, 150.0), {next(iter(gaps)): {"forces_rmse_mev_per_a": 100.0}}, {})
    assert "lost GFN2-xTB accuracy that replay kept" in lost[1]
    good = " ".join(findings(results(kept=104.0, scratch=150.0), gaps, architecture(50, 40)))
    assert "no significant forgetting" in good
    assert "fine-tuning from the foundation transfers" in good
    assert "without losing more than the change of level" in good
    assert "agrees with the paper" in good and "noise" not in good
    bad = " ".join(findings(results(kept=150.0, scratch=80.0), {}, architecture(40, 50)))
    assert "forgets part of the pretraining level" in bad
    assert "worse than training from scratch" in bad
    assert "does not reproduce the paper's claim" in bad
    mixed = findings(
        results(104.0, 100.0), {}, {**architecture(50, 40), "arch_nonlinear": entry(40, 60)}
    )
    assert "no transfer benefit" in " ".join(mixed) and "mixed" in mixed[-1]
    close = findings({}, {}, architecture(100, 95))
    assert "agrees" in close[0] and "within one-seed noise" in close[0]


def test_render_marks_cross_level_cells_and_partial_coverage():
    table = results(104.0, 150.0)
    table["foundation"][NEW_SETS[0]] = {**entry(500.0, cross=True), "configurations": 2}
    summary = {
        "quick": False,
        "test_errors": table,
        "level_gaps": {},
        "architecture": architecture(50, 40),
        "parameters": {"replay": 123},
        "training_seconds": {},
        "findings": ["x"],
    }
    text = render(summary, ALL_SETS)
    assert "500.0 † ‡2/5" in text
    assert "| n/a |" in text
    assert "Quick mode" not in text


def _labelled(geometry_id: str, positions, energy: float, forces) -> Atoms:
    atoms = Atoms("OH2", positions=positions)
    atoms.info.update(geometry_id=geometry_id, level_of_theory="x")
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.asarray(forces))
    return atoms


def test_level_gap_compares_shared_geometries_only(tmp_path):
    rng = np.random.default_rng(0)
    positions = [rng.normal(size=(3, 3)) for _ in range(4)]
    forces = [rng.normal(size=(3, 3)) for _ in range(4)]
    first = [_labelled(f"g{i}", positions[i], -10.0 - i, forces[i]) for i in range(4)]
    # the second level: a constant per-atom offset in energy and forces shifted by 0.1 eV/A
    second = [_labelled(f"g{i}", positions[i], -4.0 - i, forces[i] + 0.1) for i in range(3)]
    for name, frames in zip(ALL_SETS, (first, second, [])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.extxyz.gz").write_bytes(extxyz_gz(frames))
    (gap,) = level_gaps(tmp_path).values()
    assert gap["configurations"] == 3
    assert abs(gap["forces_rmse_mev_per_a"] - 100.0) < 1e-6
    assert gap["energy_rmse_mev_per_atom"] < 1e-6  # a per-element offset explains it
