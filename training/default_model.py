"""Check a trained replay model and install it as the shipped default (``model/default.pt``).

    crossfield train training/recipes/default/foundation.yaml
    crossfield train training/recipes/default/replay.yaml
    python -m crossfield.training.default_model [--model runs/default/replay/model.pt]

The recipe under ``training/recipes/default/`` is the whole training: pretraining on
GFN2-xTB molecules, then replay fine-tuning onto GFN1-xTB (molecules, slabs) and EMT
(metals). This step refuses a model that is not smooth at its cutoff on some head and
element pair it covers, measures every head's errors on its level's test set, and writes
``model/default.pt`` (named ``default``) and ``docs/default_model.json``, which the README
and ``tests/test_data_shipped.py`` quote.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from crossfield.model import CrossfieldMACE, load_checkpoint, save_checkpoint
from crossfield.model.smoothness import STEP, cutoff_jumps, dimer_energies, element_pairs
from crossfield.training.data import read_configurations
from crossfield.training.study_report import errors

log = logging.getLogger(__name__)

SMOOTH = 1e-9  # largest jump at r_max, relative to the pair energies' variation inside it


def largest_relative_jump(model: CrossfieldMACE) -> tuple[float, str]:
    """The worst jump at r_max over every head and the element pairs it covers."""
    worst, where = 0.0, ""
    for head in model.config.heads:
        pairs = element_pairs(head.elements or model.config.elements)
        inside = dimer_energies(model, pairs, 0.5 * model.config.r_max, head.name)
        outside = dimer_energies(model, pairs, model.config.r_max + STEP, head.name)
        scale = float(abs(inside - outside).max())
        jump = cutoff_jumps(model, heads=[head.name], pairs=pairs)[0]
        if abs(jump.jump) / scale > worst:
            worst, where = abs(jump.jump) / scale, jump.describe()
    return worst, where


def head_test_errors(model: CrossfieldMACE, data: Path) -> dict[str, dict[str, Any]]:
    """Each head's errors on its level's test set (``level_of_theory.data_set``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order as the trainer's logged metrics
    try:
        table = {}
        for head in model.config.heads:
            name = head.level_of_theory["data_set"]
            configs = read_configurations(data / name / "test.extxyz.gz")
            table[head.name] = {"data_set": name, **errors(model, configs, head.name)}
        return table
    finally:
        torch.set_num_threads(previous)


def install(trained: Path, data: Path, target: Path, report: Path) -> dict[str, Any]:
    model = load_checkpoint(trained, dtype=torch.float64)
    jump, where = largest_relative_jump(model)
    if jump > SMOOTH:
        raise SystemExit(f"{trained}: not smooth at the cutoff ({where}); not installed")
    shipped = load_checkpoint(trained)  # in its trained precision
    shipped.metadata = {**shipped.metadata, "name": "default"}
    save_checkpoint(shipped, target, shipped.metadata)
    summary = {
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "epochs": shipped.metadata.get("epochs_run"),
        "largest_relative_cutoff_jump": jump,
        "test_errors": head_test_errors(load_checkpoint(target), data),
        "heads": {
            h.name: {"elements": h.elements, "systems": h.systems} for h in shipped.config.heads
        },
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossfield.training.default_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=Path("runs/default/replay/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--target", type=Path, default=Path("model/default.pt"))
    parser.add_argument("--report", type=Path, default=Path("docs/default_model.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = install(args.model, args.data, args.target, args.report)
    for head, row in summary["test_errors"].items():
        log.info(
            "%-9s %-24s energy RMSE %6.1f meV/atom, force RMSE %6.1f meV/A",
            head,
            row["data_set"],
            row["energy_rmse_mev_per_atom"],
            row["forces_rmse_mev_per_a"],
        )
    log.info("installed %s (report %s)", args.target, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
