"""Gated equivariant non-linearity for the MH-1 interaction block.

Input layout (e3nn's Gate convention, after sorting and merging equal irreps):
``[scalars (C x 0e) | one gate scalar per gated irrep block | gated l > 0 irreps]``.
Scalars go through SiLU; each l > 0 feature is multiplied by the sigmoid of its own gate.
Both activations are rescaled to unit second moment on a standard normal input
(e3nn's ``normalize2mom``), which keeps feature magnitudes stable through depth.
"""

from __future__ import annotations

import torch
from e3nn import o3
from e3nn.math import normalize2mom


class GatedNonlinearity(torch.nn.Module):
    def __init__(self, irreps_out: o3.Irreps) -> None:
        super().__init__()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        self.num_scalars = scalars.dim
        self.num_gates = gated.num_irreps
        self.gated_blocks = [(mul, ir.dim) for mul, ir in gated]
        self.irreps_in = (scalars + o3.Irreps(f"{self.num_gates}x0e") + gated).simplify()
        self.irreps_out = irreps_out
        self.scalar_act = normalize2mom(torch.nn.functional.silu)
        self.gate_act = normalize2mom(torch.sigmoid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        scalars = self.scalar_act(x[:, : self.num_scalars])
        if not self.gated_blocks:
            return scalars
        start = self.num_scalars
        gates = self.gate_act(x[:, start : start + self.num_gates])
        start += self.num_gates
        parts, gate_start = [scalars], 0
        for mul, dim in self.gated_blocks:
            block = x[:, start : start + mul * dim].reshape(n, mul, dim)
            gate = gates[:, gate_start : gate_start + mul].unsqueeze(-1)
            parts.append((block * gate).reshape(n, mul * dim))
            start += mul * dim
            gate_start += mul
        return torch.cat(parts, dim=-1)
