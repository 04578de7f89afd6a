"""Reading labelled data, batching, statistics, the loss and the training config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from training_support import single_thread

from crossfield.model import build_batch
from crossfield.training.config import TrainConfig, build, load_config
from crossfield.training.data import DataKeys, Dataset, build_targets, read_configurations
from crossfield.training.loss import LossConfig, weighted_loss
from crossfield.training.statistics import average_num_neighbours, fit_e0s, scale_and_shift


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _frame(rng, symbols="CuCuAl", periodic=True) -> Atoms:
    n = len(Atoms(symbols))
    return Atoms(symbols, positions=rng.uniform(0, 3, (n, 3)), cell=np.eye(3) * 4, pbc=periodic)


def test_labels_come_from_configured_keys_or_the_calculator(tmp_path):
    rng = np.random.default_rng(0)
    custom = _frame(rng)
    custom.info["REF_energy"] = -3.5
    custom.arrays["REF_forces"] = rng.normal(size=(3, 3))
    custom.info["REF_stress"] = [1, 2, 3, 4, 5, 6]  # Voigt xx yy zz yz xz xy
    custom.info["w"] = 0.25
    from_calc = _frame(rng)
    forces = rng.normal(size=(3, 3))
    from_calc.calc = SinglePointCalculator(from_calc, energy=-7.0, forces=forces)
    unlabelled = _frame(rng, periodic=False)
    path = tmp_path / "data.xyz"
    write(path, [custom, from_calc, unlabelled], format="extxyz")

    keys = DataKeys(energy="REF_energy", forces="REF_forces", stress="REF_stress", weight="w")
    first = read_configurations(path, keys, head="dft")[0]
    assert first.energy == -3.5 and first.weight == 0.25 and first.head == "dft"
    np.testing.assert_allclose(first.forces, custom.arrays["REF_forces"])
    np.testing.assert_allclose(first.stress, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])

    default = read_configurations(path)
    assert default[1].energy == pytest.approx(-7.0)
    np.testing.assert_allclose(default[1].forces, forces)
    assert default[2].energy is None and default[2].forces is None

    targets = build_targets(default, ["default"])
    # frame 0 has no "energy" label: default keys fall back to mace-torch's REF_energy
    assert default[0].energy == -3.5
    assert targets.energy_weight.tolist() == [1.0, 1.0, 0.0]
    assert targets.labelled[2].tolist() == [False, False, False]


def test_any_ase_format_is_read(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = SinglePointCalculator(
        atoms, energy=-1.25, forces=np.zeros((4, 3)), stress=np.arange(6.0)
    )
    path = tmp_path / "data.traj"
    write(path, [atoms, atoms])
    configs = read_configurations(path)
    assert len(configs) == 2 and configs[0].energy == -1.25
    assert configs[0].stress[0, 1] == 5.0


def test_bad_labels_name_file_and_key(tmp_path):
    atoms = _frame(np.random.default_rng(1))
    atoms.info["config_weight"] = "heavy"
    path = tmp_path / "bad.xyz"
    write(path, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"bad.xyz\[0\]: config_weight"):
        read_configurations(path)


def test_dataset_batches_equal_build_batch(tmp_path):
    rng = np.random.default_rng(2)
    frames = []
    for n in (2, 3, 4):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 1))[:n]
        atoms.rattle(0.05, seed=n)
        atoms.calc = SinglePointCalculator(atoms, energy=float(n), forces=rng.normal(size=(n, 3)))
        frames.append(atoms)
    path = tmp_path / "d.xyz"
    write(path, frames, format="extxyz")
    configs = read_configurations(path)
    dataset = Dataset(configs, [13, 29], 4.0, ["default"])
    graph, targets = dataset.batch([2, 0])
    reference = build_batch(
        [configs[2].structure, configs[0].structure], [13, 29], 4.0, ["default"]
    )
    for name in reference.__dataclass_fields__:
        assert torch.equal(getattr(graph, name), getattr(reference, name)), name
    assert targets.energy.tolist() == [4.0, 2.0]
    assert targets.forces.shape == (6, 3)


def test_e0_least_squares_recovers_known_e0s():
    rng = np.random.default_rng(3)
    e0 = {1: -13.6, 6: -1029.5, 8: -2041.2}
    configs = []
    for _ in range(30):
        numbers = rng.choice(list(e0), size=int(rng.integers(2, 9)))
        atoms = Atoms(numbers=numbers, positions=rng.uniform(0, 5, (len(numbers), 3)))
        energy = sum(e0[int(z)] for z in numbers) + rng.normal(scale=1e-3)
        atoms.calc = SinglePointCalculator(atoms, energy=energy)
        configs.append(atoms)
    from crossfield.training.data import configuration_from_atoms

    data = [configuration_from_atoms(a, DataKeys()) for a in configs]
    fitted = fit_e0s(data, [1, 6, 7, 8])
    np.testing.assert_allclose(fitted, [-13.6, -1029.5, 0.0, -2041.2], atol=2e-3)


def test_statistics_scale_shift_and_neighbours():
    atoms = bulk("Cu", "fcc", a=3.6)  # nearest neighbours at 2.55 A, next at 3.6 A
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.array([[3.0, 0.0, 4.0]]))
    from crossfield.training.data import configuration_from_atoms

    data = [configuration_from_atoms(atoms, DataKeys())]
    assert average_num_neighbours(data, 3.0) == pytest.approx(12.0)
    stats = scale_and_shift(data, [29], [-0.25])
    assert stats.shift == pytest.approx(-0.75)
    assert stats.scale == pytest.approx(np.sqrt(25.0 / 3.0))


def _toy_targets():
    from crossfield.training.data import Targets

    return Targets(
        energy=torch.tensor([1.0, 2.0]),
        forces=torch.zeros(3, 3),
        stress=torch.zeros(2, 3, 3),
        num_atoms=torch.tensor([1, 2]),
        energy_weight=torch.tensor([1.0, 0.5]),
        forces_weight=torch.tensor([1.0, 0.0]),
        stress_weight=torch.tensor([0.0, 0.0]),
        heads=torch.tensor([0, 0]),
        labelled=torch.ones(2, 3, dtype=torch.bool),
    )


def test_loss_weights_normalisation_and_huber():
    targets = _toy_targets()
    output = {"energy": torch.tensor([1.5, 3.0]), "forces": torch.ones(3, 3)}
    config = LossConfig(energy_weight=2.0, forces_weight=10.0)
    total, parts = weighted_loss(output, targets, config)
    # energy per atom errors 0.5 and 0.5, weights 1 and 0.5; forces: only atom 0 counts
    assert parts["energy"].item() == pytest.approx((0.25 + 0.5 * 0.25) / 2)
    assert parts["forces"].item() == pytest.approx(1.0 / 3)
    assert total.item() == pytest.approx(2 * 0.1875 + 10 / 3)
    huber, _ = weighted_loss(
        output, targets, LossConfig(kind="huber", huber_delta=0.1, forces_weight=10.0)
    )
    assert huber.item() < total.item()
    with pytest.raises(ValueError, match="loss.kind"):
        LossConfig(kind="l1")


def test_config_tree_from_yaml_and_flags(tmp_path):
    (tmp_path / "train.xyz").write_text("")
    (tmp_path / "config.yaml").write_text(
        "heads:\n  - name: pbe\n    train_file: train.xyz\n    e0s: {Cu: -1.5, 13: -2.0}\n"
        "optimizer: {lr: 0.002}\nmodel: {hidden_irreps: 16x0e}\n"
    )
    config = load_config(
        tmp_path / "config.yaml", {"loss.forces_weight": "50", "head.loss_weight": 2}
    )
    assert config.heads[0].train_file == str(tmp_path / "train.xyz")
    assert config.heads[0].e0_table() == {29: -1.5, 13: -2.0}
    assert config.loss.forces_weight == 50.0 and config.heads[0].loss_weight == 2.0
    assert config.optimizer.lr == 0.002 and config.model == {"hidden_irreps": "16x0e"}
    with pytest.raises(ValueError, match=r"optimizer\.lrr"):
        build(TrainConfig, {"optimizer": {"lrr": 1}})
    with pytest.raises(ValueError, match="heads.0..epochs|heads\\[0\\]"):
        build(TrainConfig, {"heads": [{"epochs": 1}]})
    with pytest.raises(ValueError, match="train_file"):
        load_config(None, {"head.name": "x"})


def test_cli_flags_cover_every_option():
    import argparse

    from crossfield.training import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train",
            "--optimizer.lr",
            "1e-3",
            "--model.radial-mlp",
            "[8, 8]",
            "--ema-decay",
            "null",
            "--finetune.filter",
            "exclusive",
            "--head.keys.energy",
            "REF_energy",
        ]
    )
    overrides = cli.overrides_from(args)
    assert overrides == {
        "optimizer.lr": "1e-3",
        "model.radial_mlp": [8, 8],
        "ema_decay": None,
        "finetune.filter": "exclusive",
        "head.keys.energy": "REF_energy",
    }
    config = build(TrainConfig, {"optimizer": {"lr": overrides["optimizer.lr"]}})
    assert config.optimizer.lr == 1e-3
