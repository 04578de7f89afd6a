"""End-to-end training on generated EMT data: learning, logs, resume, replay fine-tuning.

One small foundation model is trained once per module (Cu/Al, EMT) and reused: by the
learning test, by the metric check and as the foundation of the fine-tuning tests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import generate, single_thread, tiny_config, write_frames

from crossfield.model import build_model, evaluate, load_checkpoint
from crossfield.training.config import TrainConfig, build
from crossfield.training.data import read_configurations
from crossfield.training.run import train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def errors(model, path, head):
    """Force and energy-per-atom RMSE (meV/A, meV/atom) of ``model`` on a file, computed here."""
    configs = read_configurations(path, head=head)
    results = evaluate(model, [c.structure for c in configs], compute_stress=False)
    forces = np.concatenate([r["forces"] - c.forces for r, c in zip(results, configs)])
    energy = np.array([(r["energy"] - c.energy) / c.num_atoms for r, c in zip(results, configs)])
    return 1000 * np.sqrt(np.mean(forces**2)), 1000 * np.sqrt(np.mean(energy**2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("emt")
    return {
        "root": root,
        "train": write_frames(root / "train.xyz", generate(40, seed=1)),
        "valid": write_frames(root / "valid.xyz", generate(10, seed=2)),
        "test": write_frames(root / "test.xyz", generate(6, seed=3)),
        "new_train": write_frames(root / "new_train.xyz", generate(12, seed=5, theory="emt+morse")),
        "new_valid": write_frames(root / "new_valid.xyz", generate(6, seed=6, theory="emt+morse")),
    }


@pytest.fixture(scope="module")
def foundation(data):
    """A tiny model trained from scratch on the EMT data (the 'pretraining')."""
    head = {
        "name": "pt_head",
        "train_file": str(data["train"]),
        "valid_file": str(data["valid"]),
        "test_file": str(data["test"]),
        "level_of_theory": {"method": "EMT"},
    }
    config = build(TrainConfig, tiny_config(data["root"] / "foundation", [head], epochs=25))
    summary = train(config)
    return {"config": config, "summary": summary, "path": summary["model_path"]}


def test_training_reduces_force_error_by_a_large_factor(data, foundation):
    model = load_checkpoint(foundation["path"])
    # the same architecture and statistics, untrained
    untrained = build_model(model.config, seed=0, dtype=torch.float64)
    before, _ = errors(untrained, data["valid"], "pt_head")
    after, _ = errors(model, data["valid"], "pt_head")
    assert after < before / 8, (before, after)
    assert foundation["summary"]["epochs_run"] == 25


def test_logged_metrics_equal_an_independent_evaluation(data, foundation):
    run = foundation["config"].output_dir
    log = json.loads(Path(run, "log.json").read_text())
    model = load_checkpoint(foundation["path"])
    forces, energy = errors(model, data["valid"], "pt_head")
    valid = log["metrics"]["pt_head"]["valid"]
    assert valid["forces_rmse_mev_per_a"] == pytest.approx(forces, rel=1e-9)
    assert valid["energy_rmse_mev_per_atom"] == pytest.approx(energy, rel=1e-9)
    test_forces, _ = errors(model, data["test"], "pt_head")
    assert log["metrics"]["pt_head"]["test"]["forces_rmse_mev_per_a"] == pytest.approx(
        test_forces, rel=1e-9
    )
    assert model.metadata["metrics"] == log["metrics"]
    # the per-epoch logs: one CSV row and one JSON record per epoch, and the plot
    rows = list(csv.DictReader(Path(run, "log.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == list(range(25))
    best = min(rows, key=lambda r: float(r["valid_loss"]))
    assert int(best["epoch"]) == log["best_epoch"]
    assert float(best["valid.pt_head.forces_rmse_mev_per_a"]) == pytest.approx(forces, rel=1e-9)
    assert Path(run, "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.config.heads[0].level_of_theory == {"method": "EMT"}


def test_resume_after_interruption_continues_exactly(data, tmp_path):
    head = {
        "name": "emt",
        "train_file": str(data["new_train"]),
        "valid_file": str(data["new_valid"]),
    }
    options = {"epochs": 4, "scheduler": {"name": "cosine"}, "early_stopping_patience": 3}
    straight = build(TrainConfig, tiny_config(tmp_path / "straight", [head], **options))
    resumed = build(TrainConfig, tiny_config(tmp_path / "resumed", [head], **options))
    train(straight)

    def interrupt(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(resumed, interrupt)
    assert not (tmp_path / "resumed" / "run" / "model.pt").exists()
    train(resumed)

    a = torch.load(tmp_path / "straight" / "run" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "run" / "model.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    log_a = json.loads((tmp_path / "straight" / "run" / "log.json").read_text())
    log_b = json.loads((tmp_path / "resumed" / "run" / "log.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in log_a["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in log_b["history"]]
    assert len({r["lr"] for r in log_a["history"]}) > 1  # the schedule state was exercised


def test_early_stopping_ends_a_run_whose_validation_loss_stalls(data, tmp_path):
    head = {"name": "emt", "train_file": str(data["new_valid"]), "valid_file": str(data["test"])}
    options = {"epochs": 50, "optimizer": {"lr": 0.0}, "early_stopping_patience": 2}
    summary = train(build(TrainConfig, tiny_config(tmp_path, [head], **options)))
    # zero learning rate: epoch 0 sets the best loss, epochs 1 and 2 do not improve on it
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 0


@pytest.mark.parametrize("keep", ["best", "last"])
def test_model_keeps_the_best_or_the_last_epoch(data, tmp_path, keep):
    """A learning rate so large that validation worsens after epoch 0: ``best`` keeps epoch
    0's weights, ``last`` the final epoch's (both the EMA average)."""
    head = {"name": "emt", "train_file": str(data["train"]), "valid_file": str(data["valid"])}
    options = {"epochs": 3, "optimizer": {"lr": 0.5}, "keep": keep, "ema_decay": None}
    config = build(TrainConfig, tiny_config(tmp_path, [head], **options))
    summary = train(config)
    kept = load_checkpoint(summary["model_path"]).state_dict()
    best = torch.load(Path(config.output_dir, "checkpoints", "best.pt"), weights_only=True)
    last = torch.load(Path(config.output_dir, "checkpoints", "state.pt"), weights_only=True)
    assert summary["best_epoch"] == 0, "the check needs an epoch that is best but not last"
    expected = best["state_dict"] if keep == "best" else last["model"]
    for key, value in kept.items():
        torch.testing.assert_close(value, expected[key].to(value.dtype), rtol=0, atol=0)


def _finetune(data, foundation, tmp_path, mode):
    head = {
        "name": "morse",
        "train_file": str(data["new_train"]),
        "valid_file": str(data["new_valid"]),
        "level_of_theory": {"method": "EMT+Morse"},
    }
    options = tiny_config(
        tmp_path / mode,
        [head],
        epochs=10,
        foundation=foundation["path"],
        optimizer={"lr": 0.005},
        finetune={
            "mode": mode,
            "replay_file": str(data["train"]),
            "num_samples": 40,
            "replay_loss_weight": 2.0,
        },
    )
    del options["model"]  # the architecture is the foundation's
    summary = train(build(TrainConfig, options))
    return load_checkpoint(summary["model_path"])


def test_replay_keeps_the_foundation_head_while_naive_fine_tuning_forgets(
    data, foundation, tmp_path
):
    base_forces, base_energy = errors(load_checkpoint(foundation["path"]), data["valid"], "pt_head")
    replay = _finetune(data, foundation, tmp_path, "replay")
    naive = _finetune(data, foundation, tmp_path, "naive")
    assert replay.config.head_names == ["pt_head", "morse"] and naive.config.head_names == ["morse"]

    replay_forces, replay_energy = errors(replay, data["valid"], "pt_head")
    naive_forces, naive_energy = errors(naive, data["valid"], "morse")
    assert replay_forces <= 1.1 * base_forces, (base_forces, replay_forces)
    assert replay_energy <= 1.1 * base_energy, (base_energy, replay_energy)
    assert naive_forces > 2 * base_forces, (base_forces, naive_forces)
    # both learned the new level of theory, which the foundation head does not know
    untuned, _ = errors(load_checkpoint(foundation["path"]), data["new_valid"], "pt_head")
    assert errors(replay, data["new_valid"], "morse")[0] < untuned / 2
    assert errors(naive, data["new_valid"], "morse")[0] < untuned / 2
    assert replay.metadata["parent"]["head"] == "pt_head"
    assert replay.metadata["parent"]["mode"] == "replay"
