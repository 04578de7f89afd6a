"""Training logs: one CSV row and one JSON record per epoch, and a learning-curve plot.

Both files are rewritten in full from the history every epoch (the history is part of
the resumable state), so a run interrupted between two writes never leaves duplicated
or missing rows after it resumes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"valid": {"pbe": {"forces_rmse": 1}}}`` -> ``{"valid.pbe.forces_rmse": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_logs(
    output_dir: str | Path, history: list[dict[str, Any]], summary: dict[str, Any] | None = None
) -> None:
    """``log.csv`` (flat columns) and ``log.json`` (history plus a run summary)."""
    output_dir = Path(output_dir)
    rows = [flatten(r) for r in history]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = io.StringIO()
    writer = csv.DictWriter(lines, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(output_dir / "log.csv", lines.getvalue())
    _atomic_write(
        output_dir / "log.json", json.dumps({"history": history, **(summary or {})}, indent=1)
    )


def plot_learning_curve(history: list[dict[str, Any]], path: str | Path) -> None:
    """Loss and validation force / energy RMSE per head against epoch, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["valid_loss"] for r in history], label="valid")
    axes[0].set_ylabel("loss")
    heads = sorted({h for r in history for h in r.get("valid", {})})
    for axis, key, label in (
        (axes[1], "forces_rmse_mev_per_a", "valid force RMSE (meV/A)"),
        (axes[2], "energy_rmse_mev_per_atom", "valid energy RMSE (meV/atom)"),
    ):
        for head in heads:
            values = [r.get("valid", {}).get(head, {}).get(key) for r in history]
            if any(v is not None for v in values):
                axis.plot(epochs, [float("nan") if v is None else v for v in values], label=head)
        axis.set_ylabel(label)
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    # fixed margins: tight_layout costs about a second per call
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.97, wspace=0.3)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
