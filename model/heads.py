"""Keep a subset of a model's heads (e.g. reduce MH-1 to the head you will fine-tune).

Readouts hold one output column per head, and the last readout one block of hidden units
per head. Dropping heads removes those columns and blocks; because e3nn's Linear divides
by sqrt(fan-in), the second layer of the non-linear readout is rescaled by sqrt(kept/all)
so that every kept head computes exactly the same energies as before.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from .config import ModelConfig
from .mace import CrossfieldMACE, build_model
from .readout import LinearReadout, NonLinearReadout


def select_heads(model: CrossfieldMACE, names: Sequence[str]) -> CrossfieldMACE:
    config = model.config
    if not names:
        raise ValueError("heads: select at least one head")
    index = [config.head_index(name) for name in names]  # KeyError names unknown heads
    if len(set(index)) != len(index):
        raise ValueError(f"heads: duplicated names in {list(names)}")
    new_config = ModelConfig.from_dict(
        {**config.to_dict(), "heads": [copy.deepcopy(config.heads[i]).__dict__ for i in index]}
    )
    selected = build_model(new_config, dtype=model.dtype)
    state = model.state_dict()
    rows = torch.tensor(index)
    state["e0s"], state["scale"], state["shift"] = (
        state["e0s"][rows],
        state["scale"][rows],
        state["shift"][rows],
    )
    num_heads, kept = config.num_heads, len(index)
    for t, readout in enumerate(model.readouts):
        prefix = f"readouts.{t}."
        if isinstance(readout, LinearReadout):
            weight = state[prefix + "linear.weight"].view(-1, num_heads)
            state[prefix + "linear.weight"] = weight[:, rows].reshape(-1)
        elif isinstance(readout, NonLinearReadout):
            first = state[prefix + "linear_1.weight"].view(
                readout.linear_1.irreps_in.dim, num_heads, -1
            )
            state[prefix + "linear_1.weight"] = first[:, rows].reshape(-1)
            width = first.shape[-1]
            second = state[prefix + "linear_2.weight"].view(num_heads, width, num_heads)
            second = second[rows][:, :, rows] * math.sqrt(kept / num_heads)
            state[prefix + "linear_2.weight"] = second.reshape(-1)
    for key in [k for k in state if k.endswith("output_mask") and k.startswith("readouts.")]:
        state[key] = selected.state_dict()[key]
    selected.load_state_dict(state, strict=True)
    selected.metadata = dict(getattr(model, "metadata", {}))
    return selected.eval()
