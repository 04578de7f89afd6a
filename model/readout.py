"""Per-layer energy readouts with one output column per head (SCIENCE.md section 5)."""

from __future__ import annotations

import torch
from e3nn import nn, o3


def own_head(outputs: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
    """Pick each atom's own head column: [N, H] -> [N]."""
    return outputs.gather(1, node_heads.unsqueeze(-1)).squeeze(-1)


class LinearReadout(torch.nn.Module):
    """A linear map of the invariant features to H atomic energies."""

    def __init__(self, irreps_in: o3.Irreps, num_heads: int) -> None:
        super().__init__()
        self.linear = o3.Linear(irreps_in, o3.Irreps(f"{num_heads}x0e"))

    def forward(self, features: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
        return own_head(self.linear(features), node_heads)


class NonLinearReadout(torch.nn.Module):
    """Linear -> SiLU -> Linear, hidden units split into H blocks, one per head.

    An atom only sees its own head's block, so heads share the backbone but not the
    last non-linearity; this is what lets a new head be fitted without moving the others.
    """

    def __init__(self, irreps_in: o3.Irreps, hidden_per_head: o3.Irreps, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        hidden = (num_heads * hidden_per_head).simplify()
        self.linear_1 = o3.Linear(irreps_in, hidden)
        self.activation = nn.Activation(hidden, [torch.nn.functional.silu])
        self.linear_2 = o3.Linear(hidden, o3.Irreps(f"{num_heads}x0e"))

    def forward(self, features: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.linear_1(features))
        if self.num_heads > 1:
            n = hidden.shape[0]
            mask = torch.nn.functional.one_hot(node_heads, self.num_heads).to(hidden.dtype)
            hidden = (hidden.view(n, self.num_heads, -1) * mask.unsqueeze(-1)).view(n, -1)
        return own_head(self.linear_2(hidden), node_heads)
