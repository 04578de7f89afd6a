"""The shipped data sets match their cards; the shipped default model matches its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ase.data import atomic_numbers, chemical_symbols

from crossfield.model import load_checkpoint
from crossfield.training.datasets.cards import CARD_JSON, check
from crossfield.training.datasets.pipeline import DATA_SETS
from crossfield.training.default_model import head_test_errors

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
DEFAULT_MODEL = ROOT / "model" / "default.pt"


@pytest.mark.parametrize("name", [spec.name for spec in DATA_SETS])
def test_shipped_data_set_matches_its_card(name):
    folder = DATA / name
    assert (folder / CARD_JSON).is_file(), f"{folder} is not shipped"
    assert check(folder) == []
    card = json.loads((folder / CARD_JSON).read_text())
    assert all(card["splits"][s]["configurations"] > 0 for s in ("train", "valid", "test"))
    assert sum(card["splits"][s]["bytes"] for s in card["splits"]) < 3_000_000


def test_default_model_is_small_trained_and_labelled():
    assert DEFAULT_MODEL.stat().st_size < 3_000_000
    model = load_checkpoint(DEFAULT_MODEL)
    heads = {h.name: h for h in model.config.heads}
    cards = {json.loads((DATA / s.name / CARD_JSON).read_text())["head"]: s.name for s in DATA_SETS}
    assert set(heads) == set(cards)
    for name, head in heads.items():
        assert head.level_of_theory["method"] in ("GFN2-xTB", "GFN1-xTB", "EMT")
        assert head.level_of_theory["data_set"] == cards[name]
    assert model.metadata["parent"]["mode"] == "replay"


def test_default_model_errors_re_measured_on_the_shipped_test_sets():
    """Every head on its level's test set: as the trainer logged it and as docs/ reports it
    (docs/default_model.json, written by ``python -m crossfield.training.default_model``).

    The replay head has no test split of its own in training (its data is a replay
    subset), so only the installer's report covers it.
    """
    model = load_checkpoint(DEFAULT_MODEL)
    published = json.loads((ROOT / "docs" / "default_model.json").read_text())["test_errors"]
    measured = head_test_errors(model, DATA)
    for head in model.config.heads:
        logged = model.metadata["metrics"][head.name]["test"]
        for key in ("forces_rmse_mev_per_a", "energy_rmse_mev_per_atom"):
            if logged:
                assert measured[head.name][key] == pytest.approx(logged[key], rel=2e-3), key
            assert measured[head.name][key] == pytest.approx(published[head.name][key], rel=2e-3)


def test_default_model_heads_know_their_coverage():
    """Each head records the elements of its training data (the server refuses others)."""
    model = load_checkpoint(DEFAULT_MODEL)
    for head in model.config.heads:
        name = head.level_of_theory["data_set"]
        card = json.loads((DATA / name / CARD_JSON).read_text())
        assert [chemical_symbols[z] for z in head.elements] == sorted(
            card["total"]["elements"], key=atomic_numbers.get
        ), head.name
