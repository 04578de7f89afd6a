"""A mace-torch user switches without rewriting anything: ``REF_``-labelled data trains with
the default keys (``config_type_weights``, ``info["head"]`` and ``REF_virials`` too), a
mace-torch training YAML trains with ``crossfield train --mace-config`` (listing what it
could not carry over), and a ``.model`` file is served as it is, by ``serve --checkpoint``
and from a repository version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.io import write
from training_support import generate, single_thread

from crossfield.cli import main
from crossfield.model import load_checkpoint
from crossfield.training.config import load_config
from crossfield.training.data import DataKeys, read_configurations


def mace_labelled(count: int, seed: int = 0) -> list:
    """EMT data relabelled the mace-torch way: REF_* keys, no calculator, config types and
    two heads in one file."""
    frames = generate(count, seed)
    for index, atoms in enumerate(frames):
        results = atoms.calc.results
        atoms.calc = None
        atoms.info["REF_energy"] = results["energy"]
        atoms.arrays["REF_forces"] = results["forces"]
        if "stress" in results:
            atoms.info["REF_stress"] = results["stress"]
        atoms.info["config_type"] = "bulk" if atoms.pbc.all() else "slab"
        atoms.info["head"] = "pbe" if index % 3 else "r2scan"
    return frames


def test_mace_keys_are_read_without_configuration(tmp_path) -> None:
    frames = mace_labelled(9)
    path = tmp_path / "mace.xyz"
    write(path, frames, format="extxyz")
    keys = DataKeys(config_type_weights={"bulk": 2.0, "Default": 5.0})
    pbe = read_configurations(path, keys, head="pbe")
    assert [c.source for c in pbe] == [f"{path}[{i}]" for i in range(9) if i % 3]
    for config in pbe:
        atoms = frames[int(config.source.rsplit("[", 1)[1][:-1])]
        assert config.energy == pytest.approx(atoms.info["REF_energy"], abs=1e-7)
        np.testing.assert_allclose(config.forces, atoms.arrays["REF_forces"], atol=1e-7)
        assert (config.stress is not None) == ("REF_stress" in atoms.info)
        assert config.weight == (2.0 if atoms.info["config_type"] == "bulk" else 1.0)
    assert len(read_configurations(path, keys, head="r2scan")) == 3
    assert len(read_configurations(path, keys, head="other")) == 9  # never named: all

    # mace-torch's virials, for files that carry them instead of stress
    crystal = frames[0].copy()
    stress = crystal.info.pop("REF_stress")
    from ase.stress import voigt_6_to_full_3x3_stress

    crystal.info["REF_virials"] = -voigt_6_to_full_3x3_stress(stress) * crystal.get_volume()
    write(tmp_path / "virials.xyz", crystal, format="extxyz")
    [config] = read_configurations(tmp_path / "virials.xyz")
    np.testing.assert_allclose(config.stress, voigt_6_to_full_3x3_stress(stress), atol=1e-7)
    assert config.weight == 1.0


MACE_YAML = {
    "name": "from_mace",
    "model": "MACE",
    "num_channels": 8,
    "max_L": 1,
    "r_max": 4.0,
    "max_ell": 2,
    "correlation": 2,
    "num_interactions": 2,
    "radial_MLP": "[16, 16]",
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
    "batch_size": 4,
    "valid_batch_size": 8,
    "max_num_epochs": 2,
    "lr": 0.01,
    "E0s": "average",
    "config_type_weights": '{"Default": 1.0, "bulk": 2.0}',
    "default_dtype": "float64",
    "device": "cpu",
    "scheduler": "ReduceLROnPlateau",
    "ema": True,
    "ema_decay": 0.9,
    "swa": True,
    "wandb": False,
    "model_dir": "run",
    "heads": {
        "pbe": {"train_file": "mace.xyz", "valid_fraction": 0.25},
        "r2scan": {"train_file": "mace.xyz", "valid_fraction": 0.25},
    },
}


def test_mace_yaml_trains_and_lists_what_it_cannot_carry(tmp_path, capsys, monkeypatch) -> None:
    write(tmp_path / "mace.xyz", mace_labelled(16, seed=1), format="extxyz")
    (tmp_path / "mace.yaml").write_text(yaml.safe_dump(MACE_YAML))
    monkeypatch.chdir(tmp_path)  # mace-torch reads data paths from the current folder

    assert main(["train", "--mace-config", "mace.yaml", "--write-config", "ours.yaml"]) == 0
    err = capsys.readouterr().err
    assert "not carried over from mace.yaml:" in err
    assert "swa," in err and "wandb: mace-torch bookkeeping" in err
    assert "heads.pbe.E0s: 'average' (fitted by least squares instead)" in err
    config = load_config("ours.yaml")
    assert config.model["hidden_irreps"] == "8x0e+8x1o" and config.model["num_layers"] == 2
    assert config.model["interaction"] == "residual" and config.epochs == 2
    assert config.ema_decay == 0.9 and config.scheduler.name == "plateau"
    assert [h.name for h in config.heads] == ["pbe", "r2scan"]
    assert config.heads[0].keys.config_type_weights == {"Default": 1.0, "bulk": 2.0}
    assert config.heads[0].train_file == str(tmp_path / "mace.xyz")

    with single_thread():
        status = main(["train", "--mace-config", "mace.yaml", "--progress", "false"])
    assert status == 0, capsys.readouterr().err
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model.config.head_names == ["pbe", "r2scan"]
    assert model.config.hidden_irreps == "8x0e+8x1o"
    assert sorted(model.config.elements) == [13, 29]


def test_wrong_mace_yaml_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "m.yaml").write_text("- not a mapping\n")
    assert main(["train", "--mace-config", str(tmp_path / "m.yaml")]) == 2
    assert "the top level must be a mapping" in capsys.readouterr().err


mace_reference = pytest.importorskip("mace_reference", reason="mace-torch is not installed")


@pytest.fixture(scope="module")
def mace_file(tmp_path_factory) -> Path:
    import torch

    model = mace_reference.make_mace_model([1, 8], ["Default"], seed=3, hidden="8x0e+8x1o")
    path = tmp_path_factory.mktemp("mace") / "water.model"
    torch.save(model, path)
    return path


def mace_energy(path: Path, atoms) -> float:
    import torch

    model = torch.load(path, weights_only=False)
    out, _ = mace_reference.evaluate_mace(model, [atoms], ["Default"], ["Default"], False)
    return float(out["energy"][0])


def test_serve_checkpoint_dot_model(mace_file, tmp_path) -> None:
    from ase.build import molecule
    from client_support import free_port

    from crossfield.client import RemoteCalculator

    port = free_port()
    command = [sys.executable, "-m", "crossfield.cli", "serve", "--checkpoint", str(mace_file)]
    command += ["--port", str(port), "--metrics-port", "-1", "--dtype", "float64"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        for line in server.stdout:
            if "listening on port" in line:
                break
        else:
            pytest.fail(f"the server did not start: {server.wait()}")
        water = molecule("H2O")
        water.calc = RemoteCalculator(f"127.0.0.1:{port}", model="water")
        assert water.get_potential_energy() == pytest.approx(
            mace_energy(mace_file, water), abs=1e-8
        )
        assert water.calc.last_result.model == "water"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dot_model_in_a_repository_version_and_offline(mace_file, tmp_path) -> None:
    import ase.io
    from ase.build import molecule

    from crossfield.server.repository import fingerprint, read_version

    version = tmp_path / "repo" / "water" / "1"
    version.mkdir(parents=True)
    (version / "water.model").write_bytes(mace_file.read_bytes())
    assert fingerprint(version)[0] is not None  # a dropped-in .model is the version's file
    model, _ = read_version(tmp_path / "repo", "water", 1)
    water = molecule("H2O")
    water.rattle(0.05, seed=1)
    from crossfield.model import Structure, evaluate

    [ours] = evaluate(model, [Structure.from_atoms(water)], compute_stress=False)
    assert float(ours["energy"]) == pytest.approx(mace_energy(mace_file, water), abs=1e-8)

    ase.io.write(tmp_path / "in.xyz", water)
    out = tmp_path / "out.xyz"
    assert main(["compute", str(tmp_path / "in.xyz"), "--out", str(out), "--no-progress",
                 "--checkpoint", str(mace_file)]) == 0  # fmt: skip
    assert ase.io.read(out).info["crossfield_energy"] == pytest.approx(float(ours["energy"]))
