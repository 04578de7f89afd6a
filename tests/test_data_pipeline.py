"""The data pipeline on a handful of tiny structures: geometries, splits, labels, cards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT

from crossfield.training.data_cli import main as data_main
from crossfield.training.datasets import geometry
from crossfield.training.datasets.cards import check, read_frames
from crossfield.training.datasets.levels import get_level, label
from crossfield.training.datasets.pipeline import (
    DATA_SETS,
    Recipe,
    make_all,
    make_geometries,
    select,
    split_of,
)

pytest.importorskip("tblite")

TINY = Recipe(
    seed=3,
    molecules=geometry.Sampling(rattled=1, trajectories=1, snapshots=2, steps_between=2),
    molecule_names=("H2O", "NH3"),
    molecule_pairs=1,
    crystals=geometry.Sampling(rattled=1, trajectories=0, max_strain=0.03),
    alloys=0,
    slabs=geometry.Sampling(rattled=1, trajectories=0),
    slab_count=1,
    split_fractions=(0.5, 0.25, 0.25),
)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cards = make_all(out, [s.name for s in DATA_SETS], TINY, "tiny")
    return out, {c["name"]: c for c in cards}


def test_every_data_set_agrees_with_its_card(made):
    out, cards = made
    assert set(cards) == {s.name for s in DATA_SETS}
    for name in cards:
        assert check(out / name) == []
    assert data_main(["check", "--root", str(out)]) == 0


def test_labels_are_the_named_levels_of_theory(made):
    out, cards = made
    emt = [
        a
        for s in ("train", "valid", "test")
        for a in read_frames(out / "metals_surfaces_emt" / f"{s}.extxyz.gz")
    ]
    assert {a.info["config_type"] for a in emt} == {"bulk", "slab_adsorbate"}
    for atoms in emt:
        again = atoms.copy()
        again.calc = EMT()
        np.testing.assert_allclose(atoms.get_forces(), again.get_forces(), atol=1e-6)
        assert atoms.info["level_of_theory"] == "emt"
        assert ("stress" in atoms.calc.results) == all(atoms.pbc)
    # the GFN1 set reuses molecule geometries of the GFN2 set: same positions, other labels
    gfn2 = {
        a.info["geometry_id"]: a
        for s in ("train", "valid", "test")
        for a in read_frames(out / "molecules_gfn2" / f"{s}.extxyz.gz")
    }
    gfn1 = [
        a
        for s in ("train", "valid", "test")
        for a in read_frames(out / "molecules_surfaces_gfn1" / f"{s}.extxyz.gz")
    ]
    shared = [a for a in gfn1 if a.info["geometry_id"] in gfn2]
    for atoms in shared:
        other = gfn2[atoms.info["geometry_id"]]
        np.testing.assert_allclose(atoms.positions, other.positions, atol=1e-7)
        assert abs(atoms.get_potential_energy() - other.get_potential_energy()) > 0.1
    assert cards["molecules_gfn2"]["level_of_theory"]["method"] == "GFN2-xTB"
    assert cards["molecules_surfaces_gfn1"]["level_of_theory"]["method"] == "GFN1-xTB"


def test_a_tampered_file_fails_the_check(made, tmp_path):
    out, _ = made
    import shutil

    folder = tmp_path / "emt"
    shutil.copytree(out / "metals_surfaces_emt", folder)
    card = json.loads((folder / "card.json").read_text())
    card["splits"]["train"]["configurations"] += 1
    (folder / "card.json").write_text(json.dumps(card))
    problems = check(folder)
    assert any("configurations" in p for p in problems)
    assert any("sha256" not in p for p in problems)
    assert data_main(["check", str(folder)]) == 1


def test_the_same_recipe_gives_the_same_bytes(made, tmp_path):
    out, _ = made
    make_all(tmp_path, ["metals_surfaces_emt"], TINY, "tiny")
    for split in ("train", "valid", "test"):
        name = f"metals_surfaces_emt/{split}.extxyz.gz"
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_splits_keep_groups_together_and_subsets_are_nested():
    geometries = make_geometries(TINY, ["molecule"])
    frames = geometries["molecule"]
    assert len(frames) == 2 * (1 + 2)  # two molecules: one rattled copy, two MD snapshots
    by_group = {}
    for atoms in frames:
        by_group.setdefault(atoms.info["group"], set()).add(atoms.info["split"])
    assert all(len(splits) == 1 for splits in by_group.values())
    groups = [f"g{i}" for i in range(2000)]
    counts = {
        s: sum(split_of(g, 0, (0.8, 0.1, 0.1)) == s for g in groups)
        for s in ("train", "valid", "test")
    }
    assert 1500 < counts["train"] < 1700 and 120 < counts["test"] < 280
    spec = next(s for s in DATA_SETS if s.name == "molecules_surfaces_gfn1")
    many = {
        "molecule": [f for f in frames for _ in range(1)],
        "molecule_pair": [],
        "slab_adsorbate": [],
    }
    assert {a.info["geometry_id"] for a in select(spec, many, TINY.seed)} <= {
        a.info["geometry_id"] for a in frames
    }


def test_a_failed_label_is_dropped_not_written():
    class Failing(EMT):
        def calculate(self, *args, **kwargs):
            from ase.calculators.calculator import CalculationFailed

            raise CalculationFailed("SCF not converged")

    atoms = geometry.slab_with_adsorbate("Cu", "111", "CO", "ontop")
    assert label(atoms, Failing()) is None
    labelled = label(atoms, get_level("emt").calculator())
    assert labelled is not None and set(labelled.arrays) == {"numbers", "positions"}


def test_slabs_and_pairs_are_physically_sensible():
    from ase.data import covalent_radii

    bond = covalent_radii[6] + covalent_radii[78]
    for site in ("ontop", "bridge", "hollow"):
        slab = geometry.slab_with_adsorbate("Pt", "100", "CH3", site)
        carbon = slab.get_chemical_symbols().index("C")
        metals = [i for i, s in enumerate(slab.get_chemical_symbols()) if s == "Pt"]
        nearest = slab.get_distances(carbon, metals, mic=True).min()
        assert nearest == pytest.approx(bond, abs=1e-6), site
        assert slab.cell[2, 2] - slab.positions[:, 2].max() > 5.0
    (pair,) = geometry.molecule_pairs(1, np.random.default_rng(0), ["H2O", "CH4"])
    distances = pair.get_all_distances()
    assert distances[np.triu_indices(len(pair), 1)].min() > 0.7
