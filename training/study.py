"""The cross-learning study, end to end.

``python -m crossfield.training.study [--quick]`` trains, with ``crossfield train`` on
the shipped data sets (``crossfield data make``):

1. ``foundation``: the pretraining level (GFN2-xTB molecules), one head;
2. ``replay``: multi-head replay fine-tuning of the foundation onto the other levels
   (GFN1-xTB molecules + surfaces, EMT metals + surfaces), as the shipped default model is
   made (``training/recipes/default/``) but on the study's shorter, equal budgets;
3. ``naive``: naive fine-tuning of the foundation on the new levels only (no replay);
4. ``scratch``: the same new heads trained from random weights on the new data only;
5. ``single_head``: one head trained on every level's data pooled together;
6. ``arch_residual`` / ``arch_nonlinear``: residual blocks with per-element products
   against the MH-1 non-linear blocks with the element-agnostic product, at about equal
   parameter counts, on the chemically most diverse set (GFN1-xTB molecules + surfaces).

Then every model is evaluated on every level's test set and ``docs/study.md``,
``docs/study.json`` and the PNG plots are written (``training/study_report.py``).
Each run writes its YAML config next to its outputs, so any single run can be repeated
with ``crossfield train <work>/<run>/config.yaml``. ``--quick`` trains two epochs on
a few dozen structures per set to check that the whole chain works (minutes); its
numbers mean nothing and it writes its report under the work folder, not ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRETRAIN_SET = "molecules_gfn2"
NEW_SETS = ("molecules_surfaces_gfn1", "metals_surfaces_emt")
DIVERSE_SET = "molecules_surfaces_gfn1"
ALL_SETS = (PRETRAIN_SET, *NEW_SETS)
SPLITS = ("train", "valid", "test")

# The shipped default model's architecture (one source: its recipe), smooth at the cutoff.
RECIPE = Path(__file__).with_name("recipes") / "default" / "foundation.yaml"


def default_architecture() -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(RECIPE.read_text())["model"])


# The architecture comparison changes only the blocks and the product basis.
ARCHITECTURES = {
    "arch_residual": {
        "interaction_first": "residual",
        "interaction": "residual",
        "product": "element",
    },
    "arch_nonlinear": {
        "interaction_first": "nonlinear",
        "interaction": "nonlinear",
        "product": "agnostic",
    },
}


@dataclass(frozen=True)
class Budget:
    """Epochs per run and how much data each split keeps (None: all)."""

    pretrain_epochs: int = 30
    finetune_epochs: int = 15
    scratch_epochs: int = 15  # as many as fine-tuning: transfer at equal training cost
    pooled_epochs: int = 15
    arch_epochs: int = 25
    replay_samples: int = 200
    max_configs: dict[str, int | None] | None = None


FULL = Budget()
QUICK = Budget(
    pretrain_epochs=2,
    finetune_epochs=2,
    scratch_epochs=2,
    pooled_epochs=2,
    arch_epochs=2,
    replay_samples=10,
    max_configs={"train": 24, "valid": 6, "test": 6},
)


def level_of(data_dir: Path, name: str) -> dict[str, Any]:
    card = json.loads((data_dir / name / "card.json").read_text())
    return {"head": card["head"], "level_of_theory": card["level_of_theory"]}


def prepare_data(data_dir: Path, work: Path, budget: Budget) -> Path:
    """The data the study trains on: the shipped files, or the first few of each (quick)."""
    if not budget.max_configs:
        return data_dir
    from ase.io import read, write

    target = work / "data"
    for name in ALL_SETS:
        (target / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / name / "card.json", target / name / "card.json")
        for split in SPLITS:
            frames = read(data_dir / name / f"{split}.extxyz.gz", index=":")
            keep = budget.max_configs.get(split)
            write(target / name / f"{split}.extxyz.gz", frames[:keep], format="extxyz")
    return target


def head_entry(data_dir: Path, name: str) -> dict[str, Any]:
    level = level_of(data_dir, name)
    return {
        "name": level["head"],
        "train_file": str(data_dir / name / "train.extxyz.gz"),
        "valid_file": str(data_dir / name / "valid.extxyz.gz"),
        "test_file": str(data_dir / name / "test.extxyz.gz"),
        "level_of_theory": {**level["level_of_theory"], "data_set": name},
    }


def pooled_files(data_dir: Path, work: Path) -> dict[str, str]:
    """Every level's data in one file per split, for the single-head baseline."""
    from ase.io import read, write

    folder = work / "data_pooled"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        frames = [a for name in ALL_SETS for a in read(data_dir / name / f"{split}.extxyz.gz", ":")]
        path = folder / f"{split}.extxyz.gz"
        write(path, frames, format="extxyz")
        files[f"{split}_file"] = str(path)
    return files


def common(work: Path, name: str, epochs: int, lr: float) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": str(work / name),
        "seed": 1,
        "dtype": "float32",
        "device": "cpu",
        "num_threads": 1,
        "loss": {"energy_weight": 1.0, "forces_weight": 10.0},
        "optimizer": {"lr": lr},
        "scheduler": {"name": "cosine", "min_lr": lr / 20},
        "epochs": epochs,
        "batch_size": 16,
        "valid_batch_size": 32,
        "ema_decay": 0.99,
        "progress": False,
        "resume": True,
    }


def run_configs(data_dir: Path, work: Path, budget: Budget) -> dict[str, dict[str, Any]]:
    """The training config of every run, keyed by run name."""
    foundation = str(work / "foundation" / "model.pt")
    new_heads = [head_entry(data_dir, n) for n in NEW_SETS]
    finetune = {
        "selection": "fps",
        "filter": "combinations",
        "num_samples": budget.replay_samples,
        "replay_file": str(data_dir / PRETRAIN_SET / "train.extxyz.gz"),
        "scale_shift": "data",
    }
    configs = {
        "foundation": {
            **common(work, "foundation", budget.pretrain_epochs, 0.01),
            "heads": [head_entry(data_dir, PRETRAIN_SET)],
            "model": default_architecture(),
        },
        "replay": {
            **common(work, "replay", budget.finetune_epochs, 0.003),
            "name": "study-replay",
            "heads": new_heads,
            "foundation": foundation,
            "finetune": {**finetune, "mode": "replay"},
        },
        "naive": {
            **common(work, "naive", budget.finetune_epochs, 0.003),
            "heads": new_heads,
            "foundation": foundation,
            "finetune": {**finetune, "mode": "naive"},
        },
        "scratch": {
            **common(work, "scratch", budget.scratch_epochs, 0.01),
            "heads": new_heads,
            "model": default_architecture(),
        },
        "single_head": {
            **common(work, "single_head", budget.pooled_epochs, 0.01),
            "heads": [
                {
                    "name": "pooled",
                    **pooled_files(data_dir, work),
                    "level_of_theory": {"method": "GFN2-xTB + GFN1-xTB + EMT pooled"},
                }
            ],
            "model": default_architecture(),
        },
    }
    for name, change in ARCHITECTURES.items():
        configs[name] = {
            **common(work, name, budget.arch_epochs, 0.01),
            "heads": [head_entry(data_dir, DIVERSE_SET)],
            "model": {**default_architecture(), **change, **matched_width(data_dir, name)},
        }
    return configs


def parameter_count(model_options: dict[str, Any], elements: list[int], heads: int = 1) -> int:
    from crossfield.model import HeadConfig, ModelConfig, build_model

    config = ModelConfig(
        elements=elements,
        heads=[HeadConfig(f"h{i}", [0.0] * len(elements)) for i in range(heads)],
        **model_options,
    )
    return sum(p.numel() for p in build_model(config, seed=0).parameters())


def matched_width(data_dir: Path, name: str) -> dict[str, Any]:
    """Channels for ``name`` so that both architectures have about the same parameter count.

    The non-linear/agnostic model keeps the default width; the residual/per-element model
    (whose product weights grow with the number of elements) gets the width whose count
    is closest to it.
    """
    if name == "arch_nonlinear":
        return {}
    from ase.data import atomic_numbers

    card = json.loads((data_dir / DIVERSE_SET / "card.json").read_text())
    elements = sorted(atomic_numbers[s] for s in card["total"]["elements"])
    target = parameter_count(
        {**default_architecture(), **ARCHITECTURES["arch_nonlinear"]}, elements
    )
    counts = {}
    for channels in range(4, 129, 2):  # counts grow with the width: stop once past the target
        options = {**default_architecture(), **ARCHITECTURES[name]}
        options["hidden_irreps"] = f"{channels}x0e+{channels}x1o"
        counts[channels] = parameter_count(options, elements)
        if counts[channels] >= target:
            break
    best = min(counts, key=lambda c: abs(counts[c] - target))
    return {"hidden_irreps": f"{best}x0e+{best}x1o"}


def train_run(name: str, config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Write the run's YAML and train it with ``crossfield train``; skip a finished run."""
    import yaml

    from crossfield.cli import main as crossfield

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = folder / "log.json"
    if (
        (folder / "model.pt").exists()
        and done.exists()
        and "metrics" in json.loads(done.read_text())
    ):
        log.info("%s: already trained, reusing %s", name, folder / "model.pt")
    else:
        started = time.perf_counter()
        if crossfield(["train", str(path), "--log-level", "WARNING"]) != 0:
            raise RuntimeError(f"crossfield train {path} failed")
        log.info("%s: trained in %.0f s", name, time.perf_counter() - started)
    return json.loads(done.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossfield.training.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default="data", help="the data sets (crossfield data make)")
    parser.add_argument("--work", default="runs/study", help="training runs go here")
    parser.add_argument("--docs", default="docs", help="where study.md and the plots go")
    parser.add_argument("--quick", action="store_true", help="2 epochs on a few structures")
    parser.add_argument("--only", nargs="+", help="train only these runs (and what they need)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    # absolute paths: the YAML configs resolve relative ones against their own folder
    work = Path(args.work).resolve() / ("quick" if args.quick else "full")
    data_dir = prepare_data(Path(args.data).resolve(), work, budget)
    configs = run_configs(data_dir, work, budget)
    wanted = args.only or list(configs)
    if any(w in ("replay", "naive") for w in wanted) and "foundation" not in wanted:
        wanted.insert(0, "foundation")
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
        raise SystemExit(f"--only: unknown runs {unknown}; choose from {list(configs)}")
    logs = {name: train_run(name, configs[name], work) for name in configs if name in wanted}

    from crossfield.training.study_report import write_report

    docs = work / "report" if args.quick else Path(args.docs)
    write_report(data_dir, work, logs, docs, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
