"""The shipped data sets match their cards; the shipped default model matches its numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossfield.model import load_checkpoint
from crossfield.training.data import read_configurations
from crossfield.training.datasets.cards import CARD_JSON, check
from crossfield.training.datasets.pipeline import DATA_SETS
from crossfield.training.study_report import errors

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
    """Every head on its level's test set: as the trainer logged it and as docs/ reports it.

    The replay head has no test split of its own in training (its data is a replay
    subset), so only the published study numbers cover it.
    """
    model = load_checkpoint(DEFAULT_MODEL)
    published = json.loads((ROOT / "docs" / "study.json").read_text())["test_errors"]["replay"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for head in model.config.heads:
            name = head.level_of_theory["data_set"]
            measured = errors(model, read_configurations(DATA / name / "test.extxyz.gz"), head.name)
            logged = model.metadata["metrics"][head.name]["test"]
            for key in ("forces_rmse_mev_per_a", "energy_rmse_mev_per_atom"):
                if logged:
                    assert measured[key] == pytest.approx(logged[key], rel=2e-3), (head.name, key)
                assert measured[key] == pytest.approx(published[name][key], rel=2e-3), (name, key)
    finally:
        torch.set_num_threads(previous)
