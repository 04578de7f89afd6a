"""One training run from a config: set up, train, publish. The CLI and tests call this."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crossfield.training.config import TrainConfig
from crossfield.training.distributed import setup_distributed, teardown_distributed
from crossfield.training.replay import prepare_finetune
from crossfield.training.setup import build_initial_model, read_head_data
from crossfield.training.trainer import Trainer

log = logging.getLogger(__name__)


def train(
    config: TrainConfig, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train (or fine-tune, with ``config.foundation``) and publish if configured.

    Under ``torchrun`` every process calls this; only rank 0 writes files.
    """
    config.validate()
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    dist = setup_distributed(config.device)
    try:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        if config.foundation:
            model, heads, parent = prepare_finetune(config)
        else:
            heads = [read_head_data(h, config.seed) for h in config.heads]
            model, parent = build_initial_model(config, heads), None
        trainer = Trainer(config, model, heads, dist=dist, parent=parent)
        summary = trainer.fit(on_epoch_end)
        if config.publish and dist.is_main:
            from crossfield.training.publish import publish

            repo, _, name = config.publish.rstrip("/").rpartition("/")
            summary["published"] = str(
                publish(summary["model_path"], repo, name, config.publish_version)
            )
            log.info("published %s", summary["published"])
        return summary
    finally:
        teardown_distributed(dist)
        torch.set_num_threads(threads)
