"""Exponential moving average of the weights, evaluated and saved instead of the raw weights.

The averaged weights are smoother than the last optimiser step and usually generalise
better. The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first
updates so the average does not remember the random initialisation for long.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class ExponentialMovingAverage:
    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for average, parameter in zip(self.shadow, self.parameters):
            average.sub_((1.0 - decay) * (average - parameter.detach()))

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the model (for evaluation and saving)."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.shadow):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved):
                    parameter.copy_(value)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": [s.clone() for s in self.shadow],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("ema: saved state has a different number of parameters than the model")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for average, saved in zip(self.shadow, state["shadow"]):
            average.copy_(saved)
