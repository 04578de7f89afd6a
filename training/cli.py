"""``crossfield train [CONFIG.yaml] [--section.option VALUE ...]``.

Every option of the YAML file is also a flag, generated from the config dataclasses, so
flags and file can never drift apart: ``--optimizer.lr 1e-3``, ``--loss.kind huber``,
``--model.hidden-irreps 64x0e+64x1o``, ``--finetune.num-samples 2000``. ``--head.X``
sets option X of the first head (created if the file has none), ``--heads`` replaces the
heads with a YAML list. Values are parsed as YAML (``null``, ``true``, ``[16, 16]``).
Under ``torchrun`` every process runs this command and joins the process group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import typing
from typing import Any

OPTION_PREFIX = "option:"


def _leaves(cls: type, prefix: str) -> list[tuple[str, str]]:
    """``(dotted path, help)`` for every scalar option under dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += _leaves(tp, f"{path}.")
        else:
            if f.default is not dataclasses.MISSING:
                found.append((path, f"(default: {f.default!r})"))
            elif f.default_factory is not dataclasses.MISSING:
                found.append((path, f"(default: {f.default_factory()!r})"))
            else:
                found.append((path, "(required)"))
    return found


def option_paths() -> list[tuple[str, str]]:
    from crossfield.model import ModelConfig
    from crossfield.training.config import HeadDataConfig, TrainConfig

    paths = []
    for path, text in _leaves(TrainConfig, ""):
        if path == "heads":
            paths.append(("heads", "YAML list of heads, replacing the file's"))
        elif path == "model":
            paths += [
                (f"model.{p}", t)
                for p, t in _leaves(ModelConfig, "")
                if p not in ("heads", "avg_num_neighbors")
            ]
            paths.append(("model.avg_num_neighbors", "(default: computed from the training data)"))
        else:
            paths.append((path, text))
    paths += [(f"head.{p}", f"first head: {t}") for p, t in _leaves(HeadDataConfig, "")]
    return paths


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or replay-fine-tune a model from a YAML config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML training configuration")
    parser.add_argument(
        "--mace-config",
        default=None,
        metavar="MACE_YAML",
        help="train from a mace-torch training YAML instead (options it cannot carry over "
        "are listed); data paths are relative to the current folder, as in mace-torch",
    )
    parser.add_argument(
        "--write-config",
        default=None,
        metavar="YAML",
        help="with --mace-config: write the converted Crossfield config here and stop",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    for path, text in option_paths():
        flag = "--" + path.replace("_", "-")
        parser.add_argument(
            flag, dest=OPTION_PREFIX + path, default=argparse.SUPPRESS, metavar="VALUE", help=text
        )
    parser.set_defaults(func=run)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    overrides = {}
    for key, value in vars(args).items():
        if key.startswith(OPTION_PREFIX):
            overrides[key.removeprefix(OPTION_PREFIX)] = yaml.safe_load(value)
    return _coerce_model_options(overrides)


def _coerce_model_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """Model options are a free mapping in TrainConfig; type them like ModelConfig does."""
    from crossfield.model import ModelConfig
    from crossfield.training.config import build_value

    hints = typing.get_type_hints(ModelConfig)
    for key, value in overrides.items():
        if key.startswith("model."):
            # e.g. one correlation order for all layers stays an int; ModelConfig validates
            with contextlib.suppress(ValueError):
                overrides[key] = build_value(hints[key.removeprefix("model.")], value, key)
    return overrides


def run(args: argparse.Namespace) -> int:
    from crossfield.training.config import load_config
    from crossfield.training.run import train

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.mace_config is not None:
            config = _from_mace_config(args)
            if config is None:  # --write-config: converted, not trained
                return 0
        else:
            config = load_config(args.config, overrides_from(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"crossfield train: {err}", file=sys.stderr)
        return 2
    summary = train(config)
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        keys = ("model_path", "best_epoch", "epochs_run", "metrics", "published")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    return 0


def _from_mace_config(args: argparse.Namespace):
    """Convert a mace-torch YAML and say what did not carry over; the training config, or
    None once written to ``--write-config``."""
    import tempfile
    from pathlib import Path

    import yaml

    from crossfield.training.config import load_config
    from crossfield.training.mace_config import from_mace

    if args.config is not None:
        raise ValueError("--mace-config: give either a Crossfield config or a mace-torch one")
    with open(args.mace_config) as handle:
        options = yaml.safe_load(handle) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{args.mace_config}: the top level must be a mapping")
    tree, skipped = from_mace(options)
    for head in tree["heads"]:  # mace-torch reads data paths from the current folder
        for key in ("train_file", "valid_file", "test_file"):
            if head.get(key):
                head[key] = str(Path(head[key]).absolute())
    if tree.get("finetune", {}).get("replay_file"):
        tree["finetune"]["replay_file"] = str(Path(tree["finetune"]["replay_file"]).absolute())
    if skipped:
        print(
            f"crossfield train: not carried over from {args.mace_config}: {', '.join(skipped)}",
            file=sys.stderr,
        )
    text = yaml.safe_dump(tree, sort_keys=False)
    if args.write_config is not None:
        Path(args.write_config).write_text(text)
        print(f"crossfield train: wrote {args.write_config}")
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text)
        return load_config(path, overrides_from(args))
