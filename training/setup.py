"""From a training config to data per head and an initial model (training from scratch).

Reading is separate from training so that a fine-tune (``training/replay.py``) can
prepare its own model and data sets and hand both to the same trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from crossfield.model import CrossfieldMACE, HeadConfig, ModelConfig, build_model
from crossfield.training.config import HeadDataConfig, TrainConfig
from crossfield.training.data import (
    Configuration,
    elements_of,
    read_configurations,
    split_validation,
    systems_of,
)
from crossfield.training.statistics import average_num_neighbours, fit_e0s, scale_and_shift

log = logging.getLogger(__name__)


@dataclass
class HeadData:
    """The configurations of one head, already tagged with the head's name."""

    name: str
    train: list[Configuration]
    valid: list[Configuration]
    test: list[Configuration] = field(default_factory=list)
    loss_weight: float = 1.0


def read_head_data(head: HeadDataConfig, seed: int) -> HeadData:
    """Read train/valid/test files of one head; hold out a validation split if needed."""
    train = read_configurations(head.train_file, head.keys, head=head.name)
    if head.valid_file:
        valid = read_configurations(head.valid_file, head.keys, head=head.name)
    else:
        train, valid = split_validation(train, head.valid_fraction, seed)
    test = read_configurations(head.test_file, head.keys, head=head.name) if head.test_file else []
    if not train:
        raise ValueError(f"heads[{head.name}].train_file: no configurations in {head.train_file}")
    return HeadData(
        name=head.name, train=train, valid=valid, test=test, loss_weight=head.loss_weight
    )


def head_e0s(
    head: HeadDataConfig, configs: list[Configuration], elements: list[int]
) -> list[float]:
    """Given E0s (every element of the table needed) or least-squares fitted ones."""
    given = head.e0_table()
    if given is None:
        return fit_e0s(configs, elements)
    missing = [z for z in elements if z not in given]
    if missing:
        raise ValueError(f"heads[{head.name}].e0s: no value for element(s) {missing}")
    return [given[z] for z in elements]


def head_config(
    head: HeadDataConfig, data: HeadData, elements: list[int], config: TrainConfig
) -> HeadConfig:
    """E0s, scale and shift of one head from its training data (or the config's values)."""
    e0s = head_e0s(head, data.train, elements)
    stats = scale_and_shift(
        data.train, elements, e0s, config.statistics.scaling, config.statistics.shift
    )
    scale = stats.scale if head.scale is None else head.scale
    shift = stats.shift if head.shift is None else head.shift
    log.info(
        "head %s: scale %.4g, shift %.4g, E0s %s", head.name, scale, shift, dict(zip(elements, e0s))
    )
    return HeadConfig(
        name=head.name,
        e0s=e0s,
        scale=scale,
        shift=shift,
        level_of_theory=dict(head.level_of_theory),
        elements=elements_of(data.train),
        systems=systems_of(data.train),
    )


def build_initial_model(config: TrainConfig, heads: list[HeadData]) -> CrossfieldMACE:
    """A fresh model whose element table, heads and statistics come from the data."""
    options = dict(config.model)
    every = [c for h in heads for c in (*h.train, *h.valid, *h.test)]
    elements = [int(z) for z in options.pop("elements", None) or elements_of(every)]
    r_max = float(options.get("r_max", ModelConfig.__dataclass_fields__["r_max"].default))
    if "avg_num_neighbors" not in options:
        options["avg_num_neighbors"] = average_num_neighbours(
            [c for h in heads for c in h.train], r_max
        )
        log.info("average number of neighbours: %.4f", options["avg_num_neighbors"])
    head_configs = [head_config(hc, hd, elements, config) for hc, hd in zip(config.heads, heads)]
    model_config = ModelConfig.from_dict({**options, "elements": elements, "heads": head_configs})
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    return build_model(model_config, seed=config.seed, dtype=dtype)
