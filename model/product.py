"""Symmetric-contraction product basis (SCIENCE.md section 4).

For every atom i and channel c:
``B_{i,c,LM} = sum_nu sum_k W^(nu)[z_i, k, c] sum_a U^(nu)[M, a1..a_nu, k] prod_t A_{i,c,a_t}``,
evaluated Horner-style from the highest degree down:
``acc <- (acc + U^(nu) W^(nu)) . A`` contracting one input index per step.

Each step is done as one matrix product of U (flattened over its leading indices) with
the outer product ``A (x) W`` of shape [atoms * channels, D * K], which never materialises
the [atoms, channels, D^nu] tensor of a naive einsum.

Weights are per element (MACE-MP-0) or one table shared by all elements (the MH-1
"element-agnostic product").
"""

from __future__ import annotations

import torch
from e3nn import o3

from .coupling import coupling_tensor


class SymmetricContraction(torch.nn.Module):
    """Product basis for one output irrep; input [N, C, D], output [N, C, 2L+1]."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irrep_out: o3.Irrep,
        correlation: int,
        num_weight_sets: int,
        channels: int,
    ) -> None:
        super().__init__()
        self.correlation = correlation
        self.dim_out = irrep_out.dim
        self.dim_in = irreps_in.dim
        self.weights = torch.nn.ParameterList()
        for degree in range(1, correlation + 1):
            u = coupling_tensor(irreps_in, irrep_out, degree).to(torch.get_default_dtype())
            self.register_buffer(f"U_{degree}", u)
            k = u.shape[-1]
            self.weights.append(
                torch.nn.Parameter(torch.randn(num_weight_sets, k, channels) / max(k, 1))
            )

    def coupling(self, degree: int) -> torch.Tensor:
        return getattr(self, f"U_{degree}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Adopt the coupling basis stored in the checkpoint.

        Coupling tensors are data, not code: a checkpoint may carry another (equally valid)
        basis, e.g. mace-torch's non-reduced one, with its own number of paths K. The
        buffers and weights are resized to match before the usual strict copy.
        """
        for degree in range(1, self.correlation + 1):
            stored = state_dict.get(f"{prefix}U_{degree}")
            if stored is not None and stored.shape != self.coupling(degree).shape:
                current = self.coupling(degree)
                self.register_buffer(f"U_{degree}", current.new_zeros(stored.shape))
                weight = self.weights[degree - 1]
                self.weights[degree - 1] = torch.nn.Parameter(
                    weight.new_zeros(weight.shape[0], stored.shape[-1], weight.shape[2])
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor, weight_index: torch.Tensor | None) -> torch.Tensor:
        """``features`` [N, C, D]; ``weight_index`` [N] element index, or None when agnostic."""
        n, c, d = features.shape
        acc: torch.Tensor | None = None
        for degree in range(self.correlation, 0, -1):
            u = self.coupling(degree)  # [M, D^(degree-1), D, K]
            k = u.shape[-1]
            lead = u.shape[:degree]  # M and degree-1 input indices
            step = features.new_zeros(n, c, *lead)
            if k:
                w = self.weights[degree - 1]
                w = (
                    w[weight_index] if weight_index is not None else w.expand(n, -1, -1)
                )  # [N, K, C]
                outer = features.unsqueeze(-1) * w.transpose(1, 2).unsqueeze(2)  # [N, C, D, K]
                step = (outer.reshape(n * c, d * k) @ u.reshape(-1, d * k).T).reshape(n, c, *lead)
            if acc is not None:
                step = step + torch.einsum("nc...i,nci->nc...", acc, features)
            acc = step
        return acc.reshape(n, c, self.dim_out)


class ProductBasis(torch.nn.Module):
    """Symmetric contractions for every irrep of the target, then a linear mix.

    Output layout is e3nn's ``mul_ir`` for ``target_irreps``; the skip connection from the
    interaction block (if any) is added after the linear map.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        target_irreps: o3.Irreps,
        correlation: int,
        num_elements: int,
        agnostic: bool,
    ) -> None:
        super().__init__()
        self.agnostic = agnostic
        channels = target_irreps.count(o3.Irrep(0, 1))
        per_channel = o3.Irreps([ir for _, ir in irreps_in])
        self.contractions = torch.nn.ModuleList(
            SymmetricContraction(
                per_channel, ir, correlation, 1 if agnostic else num_elements, channels
            )
            for _, ir in target_irreps
        )
        self.linear = o3.Linear(target_irreps, target_irreps)

    def forward(
        self, features: torch.Tensor, node_elements: torch.Tensor, skip: torch.Tensor | None
    ) -> torch.Tensor:
        index = None if self.agnostic else node_elements
        parts = [c(features, index) for c in self.contractions]
        out = self.linear(torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=-1))
        return out if skip is None else out + skip
