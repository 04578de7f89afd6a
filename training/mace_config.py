"""A mace-torch training YAML as a Crossfield training config.

``crossfield train --mace-config mace.yaml`` lets a mace-torch user train from the file
they have. mace-torch's options are its ``mace_run_train`` flags; each one we can carry is
mapped onto our config tree, and every other one is listed back to the user by name
(with why, where it is not obvious), so nothing is dropped silently. Options that only
concern mace-torch's bookkeeping (log folders, wandb, ...) are listed too: the user
decides whether they matter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# mace-torch block names -> ours (``model.interaction``)
INTERACTIONS = {
    "RealAgnosticInteractionBlock": "plain",
    "RealAgnosticResidualInteractionBlock": "residual",
    "RealAgnosticDensityInteractionBlock": "density",
    "RealAgnosticDensityResidualInteractionBlock": "density_residual",
    "RealAgnosticResidualNonLinearInteractionBlock": "nonlinear",
}
SCHEDULERS = {"ReduceLROnPlateau": "plateau", "ExponentialLR": "exponential"}
LOSSES = {"weighted": "mse", "ef": "mse", "stress": "mse", "huber": "huber"}
HEAD_KEYS = ("train_file", "valid_file", "test_file", "valid_fraction")
DATA_KEYS = {"energy_key": "energy", "forces_key": "forces", "stress_key": "stress"}
SAME_NAME = {
    "name": "name",
    "seed": "seed",
    "batch_size": "batch_size",
    "valid_batch_size": "valid_batch_size",
    "max_num_epochs": "epochs",
    "clip_grad": "clip_grad",
    "patience": "early_stopping_patience",
    "default_dtype": "dtype",
    "device": "device",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "amsgrad": "optimizer.amsgrad",
    "lr_factor": "scheduler.factor",
    "scheduler_patience": "scheduler.patience",
    "lr_scheduler_gamma": "scheduler.gamma",
    "energy_weight": "loss.energy_weight",
    "forces_weight": "loss.forces_weight",
    "stress_weight": "loss.stress_weight",
    "huber_delta": "loss.huber_delta",
    "r_max": "model.r_max",
    "num_radial_basis": "model.num_bessel",
    "num_cutoff_basis": "model.cutoff_p",
    "max_ell": "model.max_ell",
    "correlation": "model.correlation",
    "num_interactions": "model.num_layers",
    "hidden_irreps": "model.hidden_irreps",
    "MLP_irreps": "model.readout_mlp_irreps",
    "avg_num_neighbors": "model.avg_num_neighbors",
    "pair_repulsion": "model.pair_repulsion",
    "apply_cutoff": "model.apply_cutoff",
    "use_last_readout_only": "model.last_readout_only",
    "use_agnostic_product": "model.product",
    "foundation_model": "foundation",
    "pt_train_file": "finetune.replay_file",
    "num_samples_pt": "finetune.num_samples",
    "model_dir": "output_dir",
}
# mace-torch options that change nothing in the trained model or its numbers here
BOOKKEEPING = {
    "log_dir", "checkpoints_dir", "results_dir", "downloads_dir", "log_level", "wandb",
    "wandb_project", "wandb_entity", "wandb_name", "wandb_log_hypers", "save_cpu",
    "restart_latest", "keep_checkpoints", "eval_interval", "error_table", "work_dir",
    "plot", "plot_frequency", "save_all_checkpoints", "num_workers", "pin_memory",
}  # fmt: skip


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def from_mace(options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our config tree for mace-torch ``options``, and the options not carried (each as
    ``"name: why"`` or just the name)."""
    ours: dict[str, Any] = {}
    skipped: list[str] = []
    handlers: dict[str, Callable[[Any], str | None]] = {
        "model": lambda v: None if v in ("MACE", "ScaleShiftMACE") else f"model {v!r}",
        "interaction": lambda v: _interaction(ours, "interaction", v),
        "interaction_first": lambda v: _interaction(ours, "interaction_first", v),
        "num_channels": lambda v: _channels(ours, options, v),
        "max_L": lambda v: None,  # with num_channels
        "radial_MLP": lambda v: _set(ours, "model.radial_mlp", _literal(v)),
        "scheduler": lambda v: _scheduler(ours, v),
        "loss": lambda v: _loss(ours, v),
        "optimizer": lambda v: _set(ours, "optimizer.name", str(v).lower()),
        "distance_transform": lambda v: _set(ours, "model.distance_transform", str(v).lower()),
        "multiheads_finetuning": lambda v: _set(ours, "finetune.mode", "replay" if v else "naive"),
    }
    heads = _heads(options, skipped)
    # mace-torch trains without EMA unless told; ours would average by default
    ours["ema_decay"] = options.get("ema_decay", 0.99) if options.get("ema") else None
    for name, value in options.items():
        if name in (
            "heads",
            "E0s",
            "config_type_weights",
            "ema",
            "ema_decay",
            *HEAD_KEYS,
            *DATA_KEYS,
        ):
            continue
        if name in SAME_NAME:
            if name == "use_agnostic_product":
                value = "agnostic" if value else "element"
            _set(ours, SAME_NAME[name], value)
        elif name in handlers:
            why = handlers[name](value)
            if isinstance(why, str):
                skipped.append(f"{name}: {why}")
        elif name in BOOKKEEPING:
            skipped.append(f"{name}: mace-torch bookkeeping")
        else:
            skipped.append(name)
    ours["heads"] = heads
    return ours, skipped


def _heads(options: dict[str, Any], skipped: list[str]) -> list[dict[str, Any]]:
    """mace-torch's ``heads:`` mapping (multi-head), or its one implicit head."""
    shared = (*HEAD_KEYS, *DATA_KEYS, "E0s", "config_type_weights")
    top = {k: options[k] for k in shared if k in options}
    given = options.get("heads") or {"Default": {}}
    heads = []
    for name, settings in given.items():
        merged = {**top, **(settings or {})}
        head: dict[str, Any] = {"name": str(name)}
        for key in HEAD_KEYS:
            if key in merged:
                head[key] = merged[key]
        keys = {DATA_KEYS[k]: merged[k] for k in DATA_KEYS if k in merged}
        if "config_type_weights" in merged:
            keys["config_type_weights"] = _literal(merged["config_type_weights"])
        if keys:
            head["keys"] = keys
        e0s = merged.get("E0s")
        if isinstance(e0s, dict) or (isinstance(e0s, str) and e0s.strip().startswith("{")):
            head["e0s"] = _literal(e0s)
        elif e0s is not None:
            head["e0s"] = "fit"
            if e0s != "average":
                skipped.append(f"heads.{name}.E0s: {e0s!r} (fitted by least squares instead)")
            else:
                skipped.append(f"heads.{name}.E0s: 'average' (fitted by least squares instead)")
        for key in sorted(set(settings or {}) - {*HEAD_KEYS, *DATA_KEYS, "E0s"}):
            if key != "config_type_weights":
                skipped.append(f"heads.{name}.{key}")
        heads.append(head)
    return heads


def _literal(value: Any) -> Any:
    """mace-torch writes dicts and lists as strings on its command line; YAML may keep them."""
    if isinstance(value, str):
        import ast

        return ast.literal_eval(value)
    return value


def _interaction(ours: dict[str, Any], field: str, value: Any) -> str | None:
    kind = INTERACTIONS.get(str(value))
    if kind is None:
        return f"block {value!r} has no Crossfield counterpart"
    _set(ours, f"model.{field}", kind)
    return None


def _channels(ours: dict[str, Any], options: dict[str, Any], channels: Any) -> None:
    """``num_channels`` x ``max_L`` is mace-torch's shorthand for ``hidden_irreps``."""
    if "hidden_irreps" in options:
        return None
    parity = ["0e", "1o", "2e", "3o"]
    irreps = "+".join(f"{channels}x{p}" for p in parity[: int(options.get("max_L", 1)) + 1])
    _set(ours, "model.hidden_irreps", irreps)
    return None


def _scheduler(ours: dict[str, Any], value: Any) -> str | None:
    kind = SCHEDULERS.get(str(value))
    if kind is None:
        return f"{value!r} (kept: our default, plateau)"
    _set(ours, "scheduler.name", kind)
    return None


def _loss(ours: dict[str, Any], value: Any) -> str | None:
    kind = LOSSES.get(str(value))
    if kind is None:
        return f"{value!r} (kept: weighted mse)"
    _set(ours, "loss.kind", kind)
    return None
