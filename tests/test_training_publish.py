"""``crossfield train`` flags and ``crossfield publish``: versioned, atomic model repository."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from training_support import TINY_MODEL, generate, write_frames

from crossfield.cli import main
from crossfield.model import load_checkpoint
from crossfield.training.publish import publish


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of ``crossfield train``, options split between the file and flags, published."""
    root = tmp_path_factory.mktemp("cli")
    write_frames(root / "train.xyz", generate(8, seed=21))
    config = {
        "heads": [
            {
                "name": "emt",
                "train_file": "train.xyz",
                "valid_fraction": 0.25,
                "level_of_theory": {"method": "EMT"},
            }
        ],
        "model": dict(TINY_MODEL),
        "progress": False,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    code = main(
        [
            "train",
            str(root / "config.yaml"),
            "--epochs",
            "1",
            "--num-threads",
            "1",
            "--device",
            "cpu",
            "--output-dir",
            str(root / "run"),
            "--optimizer.lr",
            "5e-3",
            "--loss.kind",
            "huber",
            "--model.num-bessel",
            "4",
            "--dtype",
            "float32",
            "--loss.stress-weight",
            "1.0",
            "--head.e0s",
            "{Cu: -0.1, Al: -0.2}",
            "--publish",
            f"{root / 'repo'}/cu-al",
            "--log-level",
            "WARNING",
        ]
    )
    assert code == 0
    return root


def test_train_flags_reach_the_model_and_the_first_version_is_published(trained):
    version = trained / "repo" / "cu-al" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["meta.json", "model.pt"]
    model = load_checkpoint(version / "model.pt")
    assert model.config.num_bessel == 4 and model.dtype == torch.float32
    assert model.config.heads[0].e0s == [-0.2, -0.1]  # table order: Al, Cu
    meta = json.loads((version / "meta.json").read_text())
    assert meta["name"] == "cu-al" and meta["version"] == 1
    # the head's coverage: the elements of its training data (the file has no config_type)
    assert meta["heads"] == [
        {"name": "emt", "level_of_theory": {"method": "EMT"}, "elements": [13, 29], "systems": None}
    ]
    assert (
        meta["training"]["loss"]["kind"] == "huber" and meta["training"]["optimizer"]["lr"] == 5e-3
    )
    assert set(meta["metrics"]["emt"]) == {"train", "valid", "test"}
    assert meta["metrics"]["emt"]["train"]["stress_rmse_mev_per_a3"] > 0
    assert meta["metrics"]["emt"]["valid"]["forces_rmse_mev_per_a"] > 0
    assert meta["parent"] is None
    assert meta["provenance"]["data"]["emt.train_file"]["sha256"]
    # no machine paths in what travels with the model (it is shown to clients)
    assert str(trained) not in json.dumps(meta)
    assert meta["config"]["elements"] == [13, 29]


def test_publish_adds_versions_atomically_and_refuses_bad_input(trained, capsys):
    repo = trained / "repo"
    checkpoint = trained / "run" / "model.pt"
    assert main(["publish", str(checkpoint), "--repo", str(repo), "--name", "cu-al"]) == 0
    assert capsys.readouterr().out.strip() == str(repo / "cu-al" / "2")
    assert publish(checkpoint, repo, "cu-al", version=7) == repo / "cu-al" / "7"
    with pytest.raises(FileExistsError, match="already exists"):
        publish(checkpoint, repo, "cu-al", version=2)
    corrupt = trained / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable Crossfield checkpoint"):
        publish(corrupt, repo, "cu-al")
    with pytest.raises(ValueError, match="version"):
        publish(checkpoint, repo, "cu-al", version=0)
    with pytest.raises(ValueError, match="model name"):
        publish(checkpoint, repo, "../escape")
    # nothing half-written is left behind: only complete version folders
    entries = sorted(p.name for p in (repo / "cu-al").iterdir())
    assert entries == ["1", "2", "7"]
    assert publish(checkpoint, repo, "cu-al").name == "8"
