"""Multi-head replay fine-tuning of a foundation model (SCIENCE.md section 7).

The foundation's head (``pt_head``) stays in the fine-tuned model and keeps training on
a *replay* subset of the foundation's own training data, while new heads learn the new
level(s) of theory from the same backbone. Training the heads together on mixed batches
is what stops the backbone from forgetting; naive fine-tuning (new data only, no
pt_head) is kept as the baseline that forgets.

Steps, in :func:`prepare_finetune`:

1. read the new heads' data; their elements define the fine-tuning element set;
2. filter the replay data by those elements (none / combinations / inclusive /
   exclusive, as mace-torch's ``fine_tuning_select``) and subsample it by farthest-point
   sampling on per-element averages of the foundation's invariant descriptors, or
   randomly;
3. build the new model by surgery (``training/surgery.py``): backbone copied, element
   tables restricted or merged, every new head starting from the pt_head readout;
4. repeat small new data sets so they are not drowned by the replay data (the data-ratio
   rule: if ``new / replay < ratio_threshold``, repeat the new data
   ``int(ratio_threshold / ratio)`` more times).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, HeadConfig, ModelConfig, load_checkpoint
from crossfield.model.config import cutoff_jump_sources
from crossfield.training.config import TrainConfig
from crossfield.training.data import (
    Configuration,
    build_graphs,
    concatenate_graphs,
    elements_of,
    read_configurations,
    split_validation,
    systems_of,
)
from crossfield.training.setup import HeadData, head_e0s, read_head_data
from crossfield.training.statistics import scale_and_shift
from crossfield.training.surgery import transplant

log = logging.getLogger(__name__)

FILTERS = ("none", "combinations", "inclusive", "exclusive")


def passes_filter(numbers: np.ndarray, elements: set[int], mode: str) -> bool:
    """Whether a configuration with atomic ``numbers`` is kept for fine-tuning ``elements``.

    - ``none``: always;
    - ``combinations``: made only of fine-tuning elements (not necessarily all of them);
    - ``inclusive``: contains every fine-tuning element (others allowed);
    - ``exclusive``: contains exactly the fine-tuning elements.
    """
    present = {int(z) for z in np.unique(numbers)}
    if mode == "none":
        return True
    if mode == "combinations":
        return present <= elements
    if mode == "inclusive":
        return elements <= present
    if mode == "exclusive":
        return present == elements
    raise ValueError(f"finetune.filter: must be one of {FILTERS}, got {mode!r}")


def filter_configurations(
    configs: Sequence[Configuration], elements: Sequence[int], mode: str
) -> list[Configuration]:
    wanted = {int(z) for z in elements}
    return [c for c in configs if passes_filter(c.structure.numbers, wanted, mode)]


def configuration_descriptors(
    model: CrossfieldMACE, configs: Sequence[Configuration], batch_size: int = 16
) -> np.ndarray:
    """One vector per configuration: the mean descriptor of each element, side by side.

    Elements absent from a configuration get a constant far outside the descriptors'
    range, so farthest-point sampling first covers the different compositions and then
    the geometries within each (mace-torch's construction).
    """
    config = model.config
    present = elements_of(configs)
    slot = {z: i for i, z in enumerate(present)}
    graphs = build_graphs(configs, config.elements, config.r_max, config.head_names)
    device = model.e0s.device
    rows = []
    for start in range(0, len(configs), batch_size):
        batch = concatenate_graphs(graphs[start : start + batch_size]).to(device, model.dtype)
        features = model.descriptors(batch).double().cpu().numpy()
        numbers = model.atomic_numbers[batch.node_elements].cpu().numpy()
        owner = batch.batch.cpu().numpy()
        for b in range(batch.num_structures):
            row = np.full((len(present), features.shape[1]), np.nan)
            for z in np.unique(numbers[owner == b]):
                row[slot[int(z)]] = features[(owner == b) & (numbers == z)].mean(axis=0)
            rows.append(row)
    stacked = np.stack(rows)
    finite = np.abs(stacked[np.isfinite(stacked)])
    fill = 1e3 * (1.0 + (finite.max() if finite.size else 0.0))
    return np.where(np.isfinite(stacked), stacked, fill).reshape(len(configs), -1)


def farthest_point_sampling(points: np.ndarray, count: int, seed: int) -> list[int]:
    """Greedy farthest-point sampling from a random (seeded) first point; O(n * count)."""
    n = len(points)
    if count >= n:
        return list(range(n))
    chosen = [int(np.random.default_rng(seed).integers(n))]
    distance = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    for _ in range(count - 1):
        index = int(np.argmax(distance))
        chosen.append(index)
        distance = np.minimum(distance, np.sum((points - points[index]) ** 2, axis=1))
    return chosen


def select_replay(
    model: CrossfieldMACE, configs: Sequence[Configuration], count: int, method: str, seed: int
) -> list[Configuration]:
    """``count`` configurations by farthest-point sampling on descriptors, or at random."""
    if count >= len(configs):
        return list(configs)
    if method == "fps":
        chosen = farthest_point_sampling(configuration_descriptors(model, configs), count, seed)
    elif method == "random":
        chosen = (
            np.random.default_rng(seed).choice(len(configs), size=count, replace=False).tolist()
        )
    else:
        raise ValueError(f"finetune.selection: must be fps or random, got {method!r}")
    return [configs[i] for i in sorted(chosen)]


def pseudolabel(
    model: CrossfieldMACE, configs: Sequence[Configuration], batch_size: int = 16
) -> list[Configuration]:
    """Replace labels with the model's own predictions on each configuration's head."""
    config = model.config
    graphs = build_graphs(configs, config.elements, config.r_max, config.head_names)
    device = model.e0s.device
    labelled = []
    for start in range(0, len(configs), batch_size):
        chunk = configs[start : start + batch_size]
        batch = concatenate_graphs(graphs[start : start + batch_size]).to(device, model.dtype)
        out = model(batch, compute_forces=True, compute_stress=True)
        ptr = batch.ptr.tolist()
        for b, c in enumerate(chunk):
            periodic = all(c.structure.pbc)
            labelled.append(
                replace(
                    c,
                    energy=float(out["energy"][b]),
                    forces=out["forces"][ptr[b] : ptr[b + 1]].detach().double().cpu().numpy(),
                    stress=out["stress"][b].detach().double().cpu().numpy() if periodic else None,
                )
            )
    return labelled


def repeat_for_ratio(heads: Sequence[HeadData], num_replay: int, threshold: float) -> int:
    """Repeat the new heads' training data in place if it is small next to the replay data.

    Returns the number of copies now in each new head's training set.
    """
    num_new = sum(len(h.train) for h in heads)
    if num_replay == 0 or num_new == 0:
        return 1
    ratio = num_new / num_replay
    if ratio >= threshold:
        return 1
    copies = 1 + int(threshold / ratio)
    for h in heads:
        h.train = h.train * copies
    log.info(
        "new data / replay data = %.3g < %.3g: new training data repeated %d times",
        ratio,
        threshold,
        copies,
    )
    return copies


def _pt_head_e0s(foundation: CrossfieldMACE, head: str, elements: Sequence[int]) -> list[float]:
    """Foundation E0s of ``head`` on the new table; elements it never saw get 0."""
    row = foundation.e0s[foundation.config.head_index(head)].tolist()
    known = foundation.config.elements
    return [row[known.index(z)] if z in known else 0.0 for z in elements]


def prepare_finetune(config: TrainConfig) -> tuple[CrossfieldMACE, list[HeadData], dict[str, Any]]:
    """The fine-tuning model, the data of its heads and the parent description."""
    ft = config.finetune
    if config.model:
        raise ValueError(
            "model: the architecture comes from the foundation; remove the model section"
        )
    foundation = load_checkpoint(config.foundation).to(torch.float64)
    pt = ft.foundation_head or foundation.config.head_names[0]
    pt_index = foundation.config.head_index(pt)
    new_heads = [read_head_data(h, config.seed) for h in config.heads]
    if ft.mode == "replay" and pt in [h.name for h in new_heads]:
        raise ValueError(
            f"heads: {pt!r} is the foundation head kept for replay; give the new head another name"
        )
    new_elements = elements_of([c for h in new_heads for c in (*h.train, *h.valid, *h.test)])

    replay: list[Configuration] = []
    if ft.mode == "replay":
        replay = _replay_data(foundation, pt, new_elements, config)

    if ft.elements == "keep":
        elements = sorted(set(foundation.config.elements) | set(new_elements))
    else:
        elements = sorted(set(new_elements) | set(elements_of(replay)))
    unknown = sorted(set(elements) - set(foundation.config.elements))
    if unknown:
        log.info("elements %s are new to the foundation: fresh element weights", unknown)

    pt_scale = float(foundation.scale[pt_index])
    pt_shift = float(foundation.shift[pt_index])
    head_configs = []
    if ft.mode == "replay":
        head_configs.append(
            HeadConfig(
                name=pt,
                e0s=_pt_head_e0s(foundation, pt, elements),
                scale=pt_scale,
                shift=pt_shift,
                level_of_theory=dict(foundation.config.heads[pt_index].level_of_theory),
                **_kept_coverage(foundation.config.heads[pt_index], elements),
            )
        )
    for head, data in zip(config.heads, new_heads):
        e0s = head_e0s(head, data.train, elements)
        if ft.scale_shift == "foundation":
            scale, shift = pt_scale, pt_shift
        else:
            stats = scale_and_shift(
                data.train, elements, e0s, config.statistics.scaling, config.statistics.shift
            )
            scale, shift = stats.scale, stats.shift
        head_configs.append(
            HeadConfig(
                name=head.name,
                e0s=e0s,
                scale=scale if head.scale is None else head.scale,
                shift=shift if head.shift is None else head.shift,
                level_of_theory=dict(head.level_of_theory),
                elements=elements_of(data.train),
                systems=systems_of(data.train),
            )
        )
    if foundation.config.reproduce_cutoff_jump:
        log.warning(
            "the foundation is discontinuous at its cutoff (%s); the fine-tuned model "
            "envelopes its radial networks and is smooth",
            "; ".join(cutoff_jump_sources(foundation.config)),
        )
    model_config = ModelConfig.from_dict(
        {
            **foundation.config.to_dict(),
            "elements": elements,
            "heads": head_configs,
            "reproduce_cutoff_jump": False,
        }
    )
    model = transplant(foundation, model_config, [pt] * len(head_configs), seed=config.seed)

    heads = list(new_heads)
    if ft.mode == "replay":
        copies = repeat_for_ratio(new_heads, len(replay), ft.ratio_threshold)
        if len(replay) > 1:
            replay_train, replay_valid = split_validation(
                replay, ft.replay_valid_fraction, config.seed
            )
        else:
            replay_train, replay_valid = replay, []
        heads = [HeadData(pt, replay_train, replay_valid, [], ft.replay_loss_weight), *new_heads]
    else:
        copies = 1
    parent = {
        "path": Path(config.foundation).name,
        "sha256": hashlib.sha256(Path(config.foundation).read_bytes()).hexdigest(),
        "name": getattr(foundation, "metadata", {}).get("name"),
        "head": pt,
        "mode": ft.mode,
        "replay_configurations": len(replay),
        "new_data_copies": copies,
        "elements": foundation.config.elements,
    }
    return model, heads, parent


def _kept_coverage(head: HeadConfig, elements: list[int]) -> dict[str, Any]:
    """The foundation head's coverage within the fine-tuned element table.

    The replayed head was trained on the foundation's data, not only on the replay
    subset, so it keeps the foundation's coverage (unknown stays unknown).
    """
    if head.elements is None:
        return {"elements": None, "systems": head.systems}
    return {"elements": [z for z in head.elements if z in elements], "systems": head.systems}


def _replay_data(
    foundation: CrossfieldMACE, pt: str, new_elements: list[int], config: TrainConfig
) -> list[Configuration]:
    ft = config.finetune
    configs = read_configurations(ft.replay_file, ft.replay_keys, head=pt)
    known = set(foundation.config.elements)
    usable = [c for c in configs if {int(z) for z in c.structure.numbers} <= known]
    if len(usable) < len(configs):
        log.warning(
            "replay: %d configurations hold elements the foundation lacks; dropped",
            len(configs) - len(usable),
        )
    filtered = filter_configurations(usable, new_elements, ft.filter)
    if not filtered:
        raise ValueError(
            f"finetune.filter: no replay configuration passes {ft.filter!r} "
            f"for elements {new_elements}"
        )
    selected = select_replay(foundation, filtered, ft.num_samples, ft.selection, config.seed)
    log.info(
        "replay: %d of %d configurations (%s filter, %s)",
        len(selected),
        len(configs),
        ft.filter,
        ft.selection,
    )
    if ft.pseudolabel:
        selected = pseudolabel(foundation, selected)
    return selected
