"""Evaluate the study's models on every level's test set and write the table and plots.

A model is always evaluated with the head of the test set's level when it has one. When
it does not (the foundation on new levels, naive fine-tuning on the pretraining level,
the pooled single-head model everywhere) the closest head answers and the cell is marked:
such numbers mix "what the model forgot" with "how far apart the two levels are", so the
table also gives the distance between the reference levels themselves on geometries they
share (``level gap``), which is the error of a perfect model of the other level.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, load_checkpoint
from crossfield.training.data import (
    Configuration,
    build_graphs,
    concatenate_graphs,
    read_configurations,
)
from crossfield.training.metrics import HeadMetrics

MODEL_RUNS = ("foundation", "replay", "naive", "scratch", "single_head")
ARCH_RUNS = ("arch_residual", "arch_nonlinear")
DESCRIPTION = {
    "foundation": "pretrained on GFN2-xTB only",
    "replay": "replay fine-tuned (3 heads), as the default model",
    "naive": "naive fine-tuned (new heads, no replay)",
    "scratch": "new heads from scratch, new data only",
    "single_head": "one head on all levels pooled",
    "arch_residual": "residual blocks + per-element product",
    "arch_nonlinear": "non-linear blocks + element-agnostic product",
}
# the head that answers for a level a model does not have, in order of preference
FALLBACK = {
    "gfn2_xtb": ("gfn1_xtb", "pooled"),
    "gfn1_xtb": ("gfn2_xtb", "pooled"),
    "emt": ("pooled",),
}


def errors(
    model: CrossfieldMACE, configs: Sequence[Configuration], head: str, batch_size: int = 32
) -> dict[str, float]:
    """Energy (meV/atom) and force (meV/A) MAE/RMSE of ``head`` on ``configs``."""
    configs = [replace(c, structure=replace(c.structure, head=head)) for c in configs]
    config = model.config
    graphs = build_graphs(configs, config.elements, config.r_max, config.head_names)
    metrics = HeadMetrics(config.head_names)
    from crossfield.training.data import build_targets

    for start in range(0, len(configs), batch_size):
        chunk = configs[start : start + batch_size]
        batch = concatenate_graphs(graphs[start : start + batch_size]).to(dtype=model.dtype)
        targets = build_targets(chunk, config.head_names).to(dtype=model.dtype)
        out = model(batch, compute_forces=True, compute_stress=False)
        metrics.add({k: v.detach() for k, v in out.items()}, targets)
    return metrics.summary().get(head, {})


def supported(model: CrossfieldMACE, configs: Sequence[Configuration]) -> list[Configuration]:
    known = set(model.config.elements)
    return [c for c in configs if {int(z) for z in c.structure.numbers} <= known]


def evaluate_all(data_dir: Path, work: Path, runs: Sequence[str]) -> dict[str, Any]:
    """``{run: {data set: {head, cross_level, configurations, errors}}}`` on the test sets."""
    from crossfield.training.study import ALL_SETS, level_of

    tests = {n: read_configurations(data_dir / n / "test.extxyz.gz") for n in ALL_SETS}
    results: dict[str, Any] = {}
    for run in runs:
        path = work / run / "model.pt"
        if not path.exists():
            continue
        model = load_checkpoint(path, dtype=torch.float64)
        heads = model.config.head_names
        row = {}
        for name, configs in tests.items():
            level = level_of(data_dir, name)["head"]
            head = (
                level if level in heads else next((h for h in FALLBACK[level] if h in heads), None)
            )
            usable = supported(model, configs)
            if head is None or not usable:
                row[name] = None
                continue
            row[name] = {
                "head": head,
                "cross_level": head != level,
                "configurations": len(usable),
                "of": len(configs),
                **errors(model, usable, head),
            }
        results[run] = row
    return results


def level_gaps(data_dir: Path) -> dict[str, dict[str, float]]:
    """Force/energy differences between two levels on the test geometries they share.

    Energies are compared after removing each level's least-squares per-element reference
    (what a model's E0s absorb), so the number is the part a per-element offset cannot fix.
    """
    from crossfield.training.datasets.cards import read_frames
    from crossfield.training.study import ALL_SETS

    frames = {n: read_frames(data_dir / n / "test.extxyz.gz") for n in ALL_SETS}
    gaps = {}
    for i, first in enumerate(ALL_SETS):
        for second in ALL_SETS[i + 1 :]:
            by_id = {a.info["geometry_id"]: a for a in frames[second]}
            pairs = [
                (a, by_id[a.info["geometry_id"]])
                for a in frames[first]
                if a.info["geometry_id"] in by_id
            ]
            if not pairs:
                continue
            df = np.concatenate([a.get_forces() - b.get_forces() for a, b in pairs]).ravel()
            symbols = sorted({s for a, _ in pairs for s in a.get_chemical_symbols()})
            counts = np.array(
                [[a.get_chemical_symbols().count(s) for s in symbols] for a, _ in pairs]
            )
            de = np.array([a.get_potential_energy() - b.get_potential_energy() for a, b in pairs])
            offsets, *_ = np.linalg.lstsq(counts, de, rcond=None)
            residual = (de - counts @ offsets) / counts.sum(axis=1)
            gaps[f"{first} vs {second}"] = {
                "configurations": len(pairs),
                "forces_rmse_mev_per_a": 1000 * float(np.sqrt(np.mean(df**2))),
                "forces_mae_mev_per_a": 1000 * float(np.mean(np.abs(df))),
                "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean(residual**2))),
            }
    return gaps


def parameter_counts(work: Path, runs: Sequence[str]) -> dict[str, int]:
    counts = {}
    for run in runs:
        path = work / run / "model.pt"
        if path.exists():
            counts[run] = sum(p.numel() for p in load_checkpoint(path).parameters())
    return counts


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    mark = " †" if entry["cross_level"] else ""
    part = (
        ""
        if entry["configurations"] == entry["of"]
        else f" ‡{entry['configurations']}/{entry['of']}"
    )
    return (
        f"{_fmt(entry.get('energy_rmse_mev_per_atom'))} / "
        f"{_fmt(entry.get('forces_rmse_mev_per_a'))}{mark}{part}"
    )


def _plot_errors(results: dict[str, Any], sets: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in MODEL_RUNS if r in results]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(runs), 1)
    for axis, key, label in (
        (axes[0], "forces_rmse_mev_per_a", "test force RMSE (meV/A)"),
        (axes[1], "energy_rmse_mev_per_atom", "test energy RMSE (meV/atom)"),
    ):
        for k, run in enumerate(runs):
            values, hatches = [], []
            for name in sets:
                entry = results[run].get(name)
                values.append(entry.get(key, np.nan) if entry else np.nan)
                hatches.append("//" if entry and entry["cross_level"] else "")
            bars = axis.bar(np.arange(len(sets)) + k * width, values, width, label=run)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        axis.set_xticks(np.arange(len(sets)) + 0.4 - width / 2, sets, fontsize=8)
        axis.set_yscale("log")
        axis.set_ylabel(label)
    from matplotlib.patches import Patch

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = [Patch(color=colours[k % len(colours)], label=run) for k, run in enumerate(runs)]
    axes[0].legend(handles=handles, fontsize=8)
    figure.suptitle("hatched: evaluated with another level's head", fontsize=9)
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.12, top=0.9, wspace=0.25)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_curves(
    logs: dict[str, Any],
    runs: Sequence[str],
    heads: Sequence[str],
    path: Path,
    labels: dict[str, str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 3.8), squeeze=False)
    for axis, head in zip(axes[0], heads):
        for run in runs:
            history = logs.get(run, {}).get("history", [])
            values = [
                r.get("valid", {}).get(head, {}).get("forces_rmse_mev_per_a") for r in history
            ]
            if any(v is not None for v in values):
                axis.plot(
                    [r["epoch"] for r in history],
                    [np.nan if v is None else v for v in values],
                    label=labels.get(run, run),
                )
        axis.set_title(f"head {head}", fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_ylabel("valid force RMSE (meV/A)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.9, wspace=0.35)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def findings(results: dict[str, Any], gaps: dict[str, Any], arch: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers (so they stay true when re-run)."""
    from crossfield.training.study import NEW_SETS, PRETRAIN_SET

    def force(run: str, name: str) -> float | None:
        entry = results.get(run, {}).get(name)
        return None if entry is None else entry.get("forces_rmse_mev_per_a")

    lines = []
    base = force("foundation", PRETRAIN_SET)
    kept = force("replay", PRETRAIN_SET)
    naive = force("naive", PRETRAIN_SET)
    if base and kept:
        change = kept / base - 1
        lines.append(
            f"Forgetting: replay fine-tuning changes the pretraining head's test force RMSE "
            f"from {base:.1f} to {kept:.1f} meV/A ({100 * change:+.0f} %): "
            + (
                "no significant forgetting (within 10 %)."
                if change <= 0.1
                else "it forgets part of the pretraining level."
            )
        )
    if base and naive:
        gap = gaps.get(f"{PRETRAIN_SET} vs {NEW_SETS[0]}", {}).get("forces_rmse_mev_per_a")
        text = (
            f"Naive fine-tuning keeps no GFN2-xTB head; its GFN1-xTB head scores {naive:.1f} "
            f"meV/A against GFN2-xTB forces ({naive / base:.1f}x the foundation)"
        )
        if gap and naive <= 1.2 * gap:
            text += (
                f", within the gap between the two reference levels ({gap:.1f} meV/A): "
                "it became a GFN1-xTB model without losing more than the change of level."
            )
        elif gap:
            text += (
                f", more than the gap between the two reference levels ({gap:.1f} meV/A) "
                "explains: it lost GFN2-xTB accuracy that replay kept."
            )
        lines.append(text + ("" if gap else "."))
    for name in NEW_SETS:
        values = {r: force(r, name) for r in ("replay", "naive", "scratch", "single_head")}
        if values["replay"] and values["scratch"]:
            ratio = values["scratch"] / values["replay"]
            verdict = (
                "fine-tuning from the foundation transfers"
                if ratio > 1.05
                else "no transfer benefit"
                if ratio > 0.95
                else "the fine-tuned model is worse than training from scratch"
            )
            text = (
                f"Transfer to {name}: force RMSE replay {values['replay']:.1f}, naive "
                f"{_fmt(values['naive'])}, scratch {values['scratch']:.1f}, single head "
                f"{_fmt(values['single_head'])} meV/A — {verdict} "
                f"(scratch/replay = {ratio:.2f}, same epochs)"
            )
            if values["naive"]:
                better = "better" if values["naive"] < values["replay"] else "worse"
                text += (
                    f"; naive is {100 * abs(values['naive'] / values['replay'] - 1):.0f} % "
                    f"{better} than replay on this new level"
                )
            lines.append(text + ".")
    pooled = results.get("single_head", {})
    if pooled:
        worst = max(
            (v.get("energy_rmse_mev_per_atom", 0) for v in pooled.values() if v), default=None
        )
        if worst is not None:
            lines.append(
                f"The pooled single-head model has one set of E0s for three levels: its worst "
                f"test energy RMSE is {worst:.0f} meV/atom (labels of different levels "
                "contradict each other on the same elements)."
            )
    if {"arch_residual", "arch_nonlinear"} <= set(arch):
        a, b = arch["arch_residual"], arch["arch_nonlinear"]
        fa, fb = a.get("forces_rmse_mev_per_a"), b.get("forces_rmse_mev_per_a")
        ea, eb = a.get("energy_rmse_mev_per_atom"), b.get("energy_rmse_mev_per_atom")
        if fa and fb and ea and eb:
            df, de = fb / fa - 1, eb / ea - 1
            if df < 0 and de < 0:
                verdict = "the direction agrees with the paper's claim"
            elif df > 0 and de > 0:
                verdict = "this does not reproduce the paper's claim"
            else:
                verdict = "mixed (one quantity better, one worse)"
            if max(abs(df), abs(de)) < 0.1:
                verdict += ", but both differences are under 10 %, within one-seed noise"
            elif min(abs(df), abs(de)) < 0.1:
                verdict += " (one of the two differences is under 10 %, within one-seed noise)"
            lines.append(
                f"Architecture on {arch['set']}: non-linear/agnostic {eb:.1f} meV/atom, "
                f"{fb:.1f} meV/A ({arch['params']['arch_nonlinear']} parameters) vs residual/"
                f"per-element {ea:.1f} meV/atom, {fa:.1f} meV/A "
                f"({arch['params']['arch_residual']} parameters); energy {100 * de:+.0f} %, "
                f"forces {100 * df:+.0f} %: {verdict}."
            )
    return lines


def write_report(
    data_dir: Path, work: Path, logs: dict[str, Any], docs: Path, quick: bool = False
) -> dict[str, Any]:
    from crossfield.training.study import ALL_SETS, DIVERSE_SET

    docs.mkdir(parents=True, exist_ok=True)
    results = evaluate_all(data_dir, work, MODEL_RUNS)
    gaps = level_gaps(data_dir)
    params = parameter_counts(work, (*MODEL_RUNS, *ARCH_RUNS))
    arch_eval = evaluate_all(data_dir, work, ARCH_RUNS)
    arch = {"set": DIVERSE_SET, "params": params}
    for run in ARCH_RUNS:
        if arch_eval.get(run, {}).get(DIVERSE_SET):
            arch[run] = arch_eval[run][DIVERSE_SET]
    text = findings(results, gaps, arch)
    summary = {
        "quick": quick,
        "test_errors": results,
        "level_gaps": gaps,
        "architecture": arch,
        "parameters": params,
        "training_seconds": {
            r: round(sum(h["time_s"] for h in logs[r].get("history", [])), 1) for r in logs
        },
        "epochs": {r: logs[r].get("epochs_run") for r in logs},
        "findings": text,
    }
    (docs / "study.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if results:
        _plot_errors(results, ALL_SETS, docs / "study_errors.png")
    _plot_curves(
        logs,
        ("replay", "naive", "scratch"),
        ("gfn1_xtb", "emt"),
        docs / "study_finetune_curves.png",
        DESCRIPTION,
    )
    _plot_curves(
        logs,
        ARCH_RUNS,
        (json.loads((data_dir / DIVERSE_SET / "card.json").read_text())["head"],),
        docs / "study_architecture.png",
        {r: f"{DESCRIPTION[r]} ({params.get(r, '?')} params)" for r in ARCH_RUNS},
    )
    (docs / "study.md").write_text(render(summary, ALL_SETS))
    return summary


def render(summary: dict[str, Any], sets: Sequence[str]) -> str:
    results, gaps, arch = summary["test_errors"], summary["level_gaps"], summary["architecture"]
    lines = ["# Cross-learning study", ""]
    if summary["quick"]:
        lines += ["**Quick mode: 2 epochs on a few structures. These numbers mean nothing.**", ""]
    lines += [
        "Made by `python -m crossfield.training.study` from the data sets in `data/` "
        "(`crossfield data make`); every run is a `crossfield train` config under "
        "`runs/study/full/<run>/config.yaml`. Test-set errors per level of theory, "
        "**energy RMSE (meV/atom) / force RMSE (meV/A)**. "
        "† = the model has no head for this level; the closest head answered. "
        "‡n/m = only the n of m test structures whose elements the model knows.",
        "",
        "## Fine-tuning strategies",
        "",
        "| model | params | " + " | ".join(sets) + " | training s |",
        "|---|---:|" + "---|" * len(sets) + "---:|",
    ]
    for run in MODEL_RUNS:
        if run in results:
            cells = " | ".join(_cell(results[run].get(n)) for n in sets)
            lines.append(
                f"| {run}: {DESCRIPTION[run]} | {summary['parameters'].get(run, '')} | {cells} | "
                f"{summary['training_seconds'].get(run, '')} |"
            )
    lines += [
        "",
        "Level gap: the reference levels against each other on shared test geometries "
        "(energy after a per-element least-squares offset); a model of one level cannot "
        "score better than this against the other.",
        "",
        "| levels | shared test structures | energy RMSE (meV/atom) | force RMSE (meV/A) |",
        "|---|---:|---:|---:|",
    ]
    for name, gap in gaps.items():
        lines.append(
            f"| {name} | {gap['configurations']} | {_fmt(gap['energy_rmse_mev_per_atom'])} | "
            f"{_fmt(gap['forces_rmse_mev_per_a'])} |"
        )
    lines += [
        "",
        "![test errors](study_errors.png)",
        "",
        "![fine-tuning curves](study_finetune_curves.png)",
    ]
    lines += [
        "",
        f"## Architecture at equal parameter budget ({arch['set']})",
        "",
        "| architecture | parameters | energy RMSE (meV/atom) | energy MAE "
        "| force RMSE (meV/A) | force MAE | training s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in ARCH_RUNS:
        entry = arch.get(run)
        if entry:
            lines.append(
                f"| {DESCRIPTION[run]} | {arch['params'].get(run, '')} | "
                + " | ".join(
                    _fmt(entry.get(k))
                    for k in (
                        "energy_rmse_mev_per_atom",
                        "energy_mae_mev_per_atom",
                        "forces_rmse_mev_per_a",
                        "forces_mae_mev_per_a",
                    )
                )
                + " | "
                f"{summary['training_seconds'].get(run, '')} |"
            )
    lines += [
        "",
        "![architecture learning curves](study_architecture.png)",
        "",
        "## What the numbers say",
        "",
    ]
    lines += [f"- {line}" for line in summary["findings"]] or ["- (no complete comparison yet)"]
    lines += ["", CAVEATS, ""]
    return "\n".join(lines)


CAVEATS = """## Caveats

- Scale: models of ~10^5 parameters (the shipped default architecture, smooth at the
  cutoff) trained for tens of epochs on ~10^3 structures on one CPU thread; the paper's
  models have ~10^6-10^7 parameters and 10^5-10^8 structures.
  Differences of a few per cent between runs are within seed-to-seed noise here (one seed).
- The levels of theory are tight binding (GFN2-xTB, GFN1-xTB) and a classical potential
  (EMT), not DFT: they stand in for the paper's DFT levels because they install from
  PyPI and run in milliseconds. GFN1-xTB slabs are Gamma-point only.
- The pretraining set shares no element with the metals in the EMT set, so transfer to
  it can only come through the shared backbone, not through element weights.
- Short training: no model is converged (see the learning curves under
  `runs/study/full/<run>/learning_curve.png`); the shipped default model is the same
  recipe trained 10x longer (400 + 150 epochs, `training/recipes/default/`), with
  errors in `docs/default_model.json`. The replay head keeps training on its
  replay subset during fine-tuning, which can hide a little forgetting. Energies are fit
  loosely: the loss weighs forces 10:1 against energies per atom, and the rattled
  configurations span several hundred meV/atom.
"""
