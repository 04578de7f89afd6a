"""Model surgery (heads and element tables) and the replay-selection helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_support import single_thread

from crossfield.model import HeadConfig, ModelConfig, Structure, build_model, evaluate
from crossfield.training.data import Configuration
from crossfield.training.replay import (
    farthest_point_sampling,
    filter_configurations,
    repeat_for_ratio,
    select_replay,
)
from crossfield.training.setup import HeadData
from crossfield.training.surgery import transplant


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _source(interaction: str, product: str) -> torch.nn.Module:
    config = ModelConfig(
        elements=[1, 6, 8, 29],
        heads=[
            HeadConfig("a", [-1.0, -2.0, -3.0, -4.0], 1.3, 0.2),
            HeadConfig("b", [-5.0, -6.0, -7.0, -8.0], 0.7, -0.1),
        ],
        r_max=4.0,
        max_ell=2,
        hidden_irreps="8x0e+8x1o",
        correlation=2,
        radial_mlp=[16, 16],
        readout_mlp_irreps="4x0e",
        interaction_first="plain" if interaction == "residual" else interaction,
        interaction=interaction,
        product=product,
    )
    model = build_model(config, seed=1, dtype=torch.float64)
    with torch.no_grad():  # move every weight off its initial value so copies are visible
        generator = torch.Generator().manual_seed(2)
        for parameter in model.parameters():
            parameter.add_(
                0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            )
    return model


def _structures(numbers: list[int], head: str, count: int = 3) -> list[Structure]:
    rng = np.random.default_rng(4)
    return [
        Structure(
            numbers=rng.choice(numbers, size=6),
            positions=rng.uniform(0, 4, (6, 3)),
            cell=np.eye(3) * 5.0,
            pbc=(True, True, True),
            head=head,
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("interaction", "product"),
    [
        ("residual", "element"),
        ("nonlinear", "agnostic"),
        ("density_residual", "element"),
        ("plain", "element"),
    ],
)
def test_transplant_restricts_elements_and_copies_heads_exactly(interaction, product):
    source = _source(interaction, product)
    new_config = ModelConfig.from_dict(
        {
            **source.config.to_dict(),
            "elements": [6, 13, 29],  # H and O dropped, Al new
            "heads": [
                HeadConfig("b", [-6.0, 0.0, -8.0], 0.7, -0.1),
                HeadConfig("new", [-6.0, 0.0, -8.0], 0.7, -0.1),
            ],
        }
    )
    target = transplant(source, new_config, ["b", "b"], seed=5)
    on_b = _structures([6, 29], "b")
    expected = evaluate(source, on_b)
    for head in ("b", "new"):
        got = evaluate(
            target, [Structure(s.numbers, s.positions, s.cell, s.pbc, head) for s in on_b]
        )
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g["energy"], e["energy"], rtol=0, atol=1e-10)
            np.testing.assert_allclose(g["forces"], e["forces"], rtol=0, atol=1e-10)
            np.testing.assert_allclose(g["stress"], e["stress"], rtol=0, atol=1e-10)
    # the new element has weights and gives finite, non-trivial energies
    with_al = evaluate(target, _structures([13, 29], "new", 1))[0]
    assert np.isfinite(with_al["energy"]) and np.all(np.isfinite(with_al["forces"]))


def test_transplant_refuses_other_architectures():
    source = _source("residual", "element")
    other = ModelConfig.from_dict(
        {**source.config.to_dict(), "max_ell": 1, "hidden_irreps": "8x0e+8x1o"}
    )
    with pytest.raises(ValueError, match="max_ell"):
        transplant(source, other, ["a", "b"])


def _config(numbers: list[int]) -> Configuration:
    structure = Structure(numbers=np.array(numbers), positions=np.zeros((len(numbers), 3)))
    return Configuration(structure=structure)


def test_element_filters_follow_mace_definitions():
    configs = [_config(n) for n in ([29], [29, 13], [29, 13, 8], [8], [13])]

    def kept(mode):
        return [
            sorted(set(c.structure.numbers.tolist()))
            for c in filter_configurations(configs, [29, 13], mode)
        ]

    assert kept("none") == [[29], [13, 29], [8, 13, 29], [8], [13]]
    assert kept("combinations") == [[29], [13, 29], [13]]
    assert kept("inclusive") == [[13, 29], [8, 13, 29]]
    assert kept("exclusive") == [[13, 29]]
    with pytest.raises(ValueError, match="finetune.filter"):
        filter_configurations(configs, [29], "some")


def test_farthest_point_sampling_covers_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = np.concatenate([c + 0.1 * rng.normal(size=(25, 2)) for c in centres])
    chosen = farthest_point_sampling(points, 4, seed=1)
    assert sorted(i // 25 for i in chosen) == [0, 1, 2, 3]
    assert farthest_point_sampling(points, 4, seed=1) == chosen


def test_fps_selection_on_model_descriptors_prefers_diverse_structures():
    source = _source("residual", "element")
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 4, (6, 3))
    near = [
        Structure(
            np.full(6, 29), base + 0.01 * rng.normal(size=(6, 3)), np.eye(3) * 5, (True,) * 3, "a"
        )
        for _ in range(6)
    ]
    far = [
        Structure(np.full(6, 29), rng.uniform(0, 4, (6, 3)), np.eye(3) * 5, (True,) * 3, "a")
        for _ in range(2)
    ]
    other = [Structure(np.array([6] * 6), base, np.eye(3) * 5, (True,) * 3, "a")]
    configs = [Configuration(structure=s) for s in near + far + other]
    chosen = select_replay(source, configs, 4, "fps", seed=0)
    picked = {id(c.structure) for c in chosen}
    assert id(other[0]) in picked  # a new composition is always covered
    assert sum(id(s) in picked for s in near) <= 2
    assert len(select_replay(source, configs, 4, "random", seed=0)) == 4


def test_small_new_data_are_repeated():
    heads = [HeadData("new", [_config([29])] * 3, [])]
    assert (
        repeat_for_ratio(heads, num_replay=100, threshold=0.1) == 4
    )  # 3/100 < 0.1: 1 + int(0.1/0.03)
    assert len(heads[0].train) == 12
    assert repeat_for_ratio(heads, num_replay=100, threshold=0.1) == 1
