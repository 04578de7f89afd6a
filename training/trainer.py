"""The training loop: optimiser, schedule, EMA, early stopping, checkpoints and resume.

Everything that influences the next step is in the resumable state written after every
epoch (``<output_dir>/checkpoints/state.pt``): weights, optimiser, scheduler, EMA, the
early-stopping counters, the history and the torch RNG state. Batches come from a
permutation seeded by ``(seed, epoch)``, so an interrupted run that resumes draws the
same batches as one that never stopped and ends with the same weights.

The model written at the end (``<output_dir>/model.pt``) carries the EMA weights of the
epoch with the lowest validation loss (``keep: best``) or of the last epoch (``keep: last``,
for a schedule that anneals to its end, or a validation set whose loss a few violent
configurations dominate), and its metadata holds the per-head metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crossfield.model import CrossfieldMACE, save_checkpoint
from crossfield.training.config import TrainConfig
from crossfield.training.data import Dataset
from crossfield.training.distributed import Distributed
from crossfield.training.ema import ExponentialMovingAverage
from crossfield.training.logs import plot_learning_curve, write_logs
from crossfield.training.loss import weighted_loss
from crossfield.training.metrics import HeadMetrics
from crossfield.training.setup import HeadData

log = logging.getLogger(__name__)

STATE_FILE = "checkpoints/state.pt"
BEST_FILE = "checkpoints/best.pt"
MODEL_FILE = "model.pt"


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = config.optimizer
    kind = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return kind(
        model.parameters(),
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
        amsgrad=o.amsgrad,
    )


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    s = config.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=s.factor, patience=s.patience, min_lr=s.min_lr
        )
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.epochs, eta_min=s.min_lr
        )
    if s.name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=s.gamma)
    return None


class Trainer:
    """Trains ``model`` on the heads' data; one instance per process under ``torchrun``."""

    def __init__(
        self,
        config: TrainConfig,
        model: CrossfieldMACE,
        heads: Sequence[HeadData],
        dist: Distributed | None = None,
        parent: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.dist = dist or Distributed()
        self.dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.device = self.dist.device
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.heads = list(heads)
        self.parent = parent
        self.output_dir = Path(config.output_dir)
        mc = model.config
        weights = {h.name: h.loss_weight for h in self.heads}
        args = (mc.elements, mc.r_max, mc.head_names, weights)
        self.train_set = Dataset([c for h in self.heads for c in h.train], *args)
        self.valid_set = Dataset([c for h in self.heads for c in h.valid], *args)
        self.test_set = Dataset([c for h in self.heads for c in h.test], *args)
        if len(self.train_set) < self.dist.world_size:
            raise ValueError(
                f"training data: {len(self.train_set)} configurations "
                f"for {self.dist.world_size} ranks"
            )
        self.compute_stress = config.loss.stress_weight > 0
        every = self.train_set.configs + self.valid_set.configs + self.test_set.configs
        self.eval_stress = any(c.stress is not None for c in every)

        self.network: torch.nn.Module = self.model
        if self.dist.enabled:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.ema = (
            ExponentialMovingAverage(self.model.parameters(), config.ema_decay)
            if config.ema_decay
            else None
        )
        self.epoch = 0  # next epoch to run
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []

    # -- batches ----------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches, identical on every rank and after a resume."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        size = self.config.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        # every rank needs at least one structure in every step
        return [b for b in batches if len(b) >= self.dist.world_size]

    # -- one epoch --------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        batches = self.global_batches(epoch)
        total = torch.zeros(1, dtype=torch.float64)
        progress = tqdm(
            batches,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not (self.config.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        for global_batch in progress:
            local = self.dist.shard(global_batch)
            graph, targets = self.train_set.batch(local)
            graph = graph.to(self.device, self.dtype)
            targets = targets.to(self.device, self.dtype)
            output = self.network(
                graph, compute_forces=True, compute_stress=self.compute_stress, training=True
            )
            loss, _ = weighted_loss(
                output,
                targets,
                self.config.loss,
                len(global_batch),
                self.train_set.num_atoms(global_batch),
            )
            self.optimizer.zero_grad(set_to_none=True)
            (loss * self.dist.world_size).backward()
            if self.config.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            total += loss.detach().double().cpu()
            progress.set_postfix(loss=f"{loss.item() * self.dist.world_size:.4g}")
        self.dist.all_reduce_sum(total)
        return float(total) / max(len(batches), 1)

    def evaluate(self, dataset: Dataset) -> tuple[float, dict[str, dict[str, float]]]:
        """Loss (normalised over the whole set) and per-head metrics, with current weights."""
        metrics = HeadMetrics(self.model.config.head_names)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        if len(dataset) == 0:
            return math.nan, {}
        mine = list(range(len(dataset)))[self.dist.rank :: self.dist.world_size]
        size = self.config.valid_batch_size
        total_atoms = dataset.num_atoms(range(len(dataset)))
        self.model.eval()
        for start in range(0, len(mine), size):
            graph, targets = dataset.batch(mine[start : start + size])
            graph = graph.to(self.device, self.dtype)
            targets = targets.to(self.device, self.dtype)
            output = self.model(
                graph, compute_forces=True, compute_stress=self.eval_stress, training=False
            )
            output = {k: v.detach() for k, v in output.items()}
            loss, _ = weighted_loss(output, targets, self.config.loss, len(dataset), total_atoms)
            loss_sum += loss.double().cpu()
            metrics.add(output, targets)
        self.dist.all_reduce_sum(loss_sum)
        self.dist.all_reduce_sum(metrics.sums)
        return float(loss_sum), metrics.summary()

    def evaluate_averaged(self, dataset: Dataset) -> tuple[float, dict[str, dict[str, float]]]:
        if self.ema is None:
            return self.evaluate(dataset)
        with self.ema.average_parameters():
            return self.evaluate(dataset)

    # -- the loop ---------------------------------------------------------------------------
    def fit(
        self, on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Train until ``epochs`` or early stopping, then write the final model and logs."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "checkpoints").mkdir(exist_ok=True)
        if self.config.resume and (self.output_dir / STATE_FILE).exists():
            self.load_state(self.output_dir / STATE_FILE)
            log.info("resumed from %s at epoch %d", self.output_dir / STATE_FILE, self.epoch)
        while self.epoch < self.config.epochs and not self.stopped_early:
            epoch = self.epoch
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss = self.train_epoch(epoch)
            valid_loss, valid_metrics = self.evaluate_averaged(self.valid_set)
            self.step_scheduler(valid_loss)
            improved = valid_loss < self.best_loss
            if improved:
                self.best_loss, self.best_epoch, self.bad_epochs = valid_loss, epoch, 0
                if self.dist.is_main:
                    self.save_model(
                        self.output_dir / BEST_FILE, {"epoch": epoch, "valid": valid_metrics}
                    )
            else:
                self.bad_epochs += 1
            patience = self.config.early_stopping_patience
            self.stopped_early = patience is not None and self.bad_epochs >= patience
            record = {
                "epoch": epoch,
                "lr": lr,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "time_s": time.perf_counter() - started,
                "valid": valid_metrics,
            }
            self.history.append(record)
            self.epoch = epoch + 1
            if self.dist.is_main:
                self.save_state(self.output_dir / STATE_FILE)
                self.write_logs()
                log.info(_describe(record))
            self.dist.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        return self.finish()

    def step_scheduler(self, valid_loss: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(valid_loss)
        elif self.scheduler is not None:
            self.scheduler.step()

    def finish(self) -> dict[str, Any]:
        """Load the kept weights, evaluate every split per head, write ``model.pt`` and logs."""
        best = self.output_dir / BEST_FILE
        if self.config.keep == "best" and best.exists():
            state = torch.load(best, map_location=self.device, weights_only=True)["state_dict"]
            self.model.load_state_dict(state)
        elif self.ema is not None:  # the last average (asked for, or nothing improved)
            with torch.no_grad():
                for parameter, average in zip(self.ema.parameters, self.ema.shadow):
                    parameter.copy_(average)
        _, valid = self.evaluate(self.valid_set)
        _, test = self.evaluate(self.test_set)
        _, train = self.evaluate(self.train_set)
        metrics = {
            head: {
                "train": train.get(head, {}),
                "valid": valid.get(head, {}),
                "test": test.get(head, {}),
            }
            for head in self.model.config.head_names
        }
        summary = {
            "best_epoch": self.best_epoch,
            "best_valid_loss": self.best_loss,
            "epochs_run": self.epoch,
            "stopped_early": self.stopped_early,
            "metrics": metrics,
        }
        if self.dist.is_main:
            self.save_model(self.output_dir / MODEL_FILE, summary, averaged=False)
            self.write_logs(summary)
        self.dist.barrier()
        return {**summary, "model_path": str(self.output_dir / MODEL_FILE)}

    # -- files ------------------------------------------------------------------------------
    def metadata(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint metadata, JSON-round-tripped so it loads with ``weights_only=True``."""
        meta = {
            "name": self.config.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance(self.config, self.heads, self.dist.world_size),
            "training": without_paths(self.config.to_dict()),
            "parent": without_paths(self.parent),
            **extra,
        }
        return json.loads(json.dumps(meta, default=str))

    def save_model(self, path: Path, extra: dict[str, Any], averaged: bool = True) -> None:
        """The model as a self-describing checkpoint, with the EMA weights if ``averaged``."""
        if averaged and self.ema is not None:
            with self.ema.average_parameters():
                save_checkpoint(self.model, path, self.metadata(extra))
        else:
            save_checkpoint(self.model, path, self.metadata(extra))

    def write_logs(self, summary: dict[str, Any] | None = None) -> None:
        write_logs(self.output_dir, self.history, summary)
        if self.history:
            plot_learning_curve(self.history, self.output_dir / "learning_curve.png")

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "model_config": self.model.config.to_dict(),
        }

    def save_state(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["model_config"] != self.model.config.to_dict():
            raise ValueError(
                f"{path}: the saved run has another model configuration; "
                "use a new output_dir or resume: false"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.best_loss = float(state["best_loss"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped_early = bool(state["stopped_early"])
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])


def provenance(config: TrainConfig, heads: Sequence[HeadData], world_size: int) -> dict[str, Any]:
    """Where a model came from: software versions, machine, data files and their sizes."""
    files = {}
    for h in config.heads:
        for split in ("train_file", "valid_file", "test_file"):
            path = getattr(h, split)
            if path:
                files[f"{h.name}.{split}"] = _file_info(path)
    if config.foundation:
        files["foundation"] = _file_info(config.foundation)
        if config.finetune.replay_file:
            files["replay_file"] = _file_info(config.finetune.replay_file)
    return {
        "crossfield": _version("crossfield"),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "world_size": world_size,
        "data": files,
        "num_configurations": {
            h.name: {"train": len(h.train), "valid": len(h.valid), "test": len(h.test)}
            for h in heads
        },
    }


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _file_info(path: str) -> dict[str, Any]:
    import hashlib

    p = Path(path)
    if not p.is_file():
        return {"name": portable_name(path)}
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"name": portable_name(path), "bytes": p.stat().st_size, "sha256": digest}


PATH_KEYS = ("path", "output_dir", "publish", "foundation")


def portable_name(path: str) -> str:
    """A file's name and its folder's (``molecules_gfn2/train.extxyz.gz``), no machine path.

    A published checkpoint travels to other machines and its metadata is shown to
    clients: it names files by what identifies them (this, plus size and sha256), never
    by where they lay on the training machine.
    """
    return "/".join(Path(path).parts[-2:])


def without_paths(data: Any) -> Any:
    """``data`` with every file-path value (``PATH_KEYS``, ``*_file``) made portable."""
    if isinstance(data, dict):
        return {
            key: portable_name(value)
            if isinstance(value, str) and (key in PATH_KEYS or key.endswith("_file"))
            else without_paths(value)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [without_paths(item) for item in data]
    return data


def _describe(record: dict[str, Any]) -> str:
    parts = [
        f"epoch {record['epoch']}",
        f"lr {record['lr']:.3g}",
        f"train {record['train_loss']:.4g}",
        f"valid {record['valid_loss']:.4g}",
    ]
    for head, values in record["valid"].items():
        e = values.get("energy_rmse_mev_per_atom")
        f = values.get("forces_rmse_mev_per_a")
        parts.append(
            f"{head}: E {e:.2f} meV/atom, F {f:.1f} meV/A"
            if e is not None and f is not None
            else f"{head}: {values}"
        )
    return " | ".join(parts)
