"""Per-head error metrics, accumulated as sums so data-parallel ranks can add them up.

Energies are compared per atom (meV/atom), forces per Cartesian component (meV/A) and
stress per tensor component (meV/A^3); MAE and RMSE of each. Only labelled quantities
count: a configuration without a stress label adds nothing to the stress sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from crossfield.training.data import Targets

# order of the accumulated sums per head
_QUANTITIES = ("energy", "forces", "stress")
_SUMS = ("abs", "sq", "count")


class HeadMetrics:
    """Running error sums for every head: one tensor [H, 3 quantities, 3 sums]."""

    def __init__(self, head_names: Sequence[str]) -> None:
        self.head_names = list(head_names)
        self.sums = torch.zeros(
            len(self.head_names), len(_QUANTITIES), len(_SUMS), dtype=torch.float64
        )

    @torch.no_grad()
    def add(self, output: dict[str, torch.Tensor], targets: Targets) -> None:
        n = targets.num_atoms.to(torch.float64)
        heads = targets.heads
        de = (output["energy"].detach().double() - targets.energy.double()) / n
        labelled = targets.labelled.double()
        self._accumulate(0, heads, de, labelled[:, 0], 1)
        atom_heads = torch.repeat_interleave(heads, targets.num_atoms)
        has_forces = torch.repeat_interleave(labelled[:, 1], targets.num_atoms)
        df = output["forces"].detach().double() - targets.forces.double()
        self._accumulate(1, atom_heads, df, has_forces, 3)
        if "stress" in output:
            ds = (output["stress"].detach().double() - targets.stress.double()).reshape(-1, 9)
            self._accumulate(2, heads, ds, labelled[:, 2], 9)

    def _accumulate(
        self,
        quantity: int,
        heads: torch.Tensor,
        error: torch.Tensor,
        mask: torch.Tensor,
        width: int,
    ) -> None:
        error = error.reshape(len(mask), -1).cpu()
        mask = mask.cpu()
        heads = heads.cpu()
        rows = torch.stack(
            [(error.abs().sum(-1)) * mask, (error.square().sum(-1)) * mask, mask * width], dim=-1
        )
        self.sums[:, quantity].index_add_(0, heads, rows)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{head: {energy_mae_mev_per_atom, ..., forces_rmse_mev_per_a, ...}}``.

        Only quantities with at least one label appear.
        """
        units = {"energy": "mev_per_atom", "forces": "mev_per_a", "stress": "mev_per_a3"}
        result = {}
        for h, head in enumerate(self.head_names):
            values = {}
            for q, quantity in enumerate(_QUANTITIES):
                abs_sum, sq_sum, count = self.sums[h, q].tolist()
                if count > 0:
                    values[f"{quantity}_mae_{units[quantity]}"] = 1000.0 * abs_sum / count
                    values[f"{quantity}_rmse_{units[quantity]}"] = 1000.0 * math.sqrt(
                        sq_sum / count
                    )
            if values:
                result[head] = values
        return result
