"""Symmetric-contraction product basis (SCIENCE.md section 4).

For every atom i and channel c:
``B_{i,c,LM} = sum_nu sum_k W^(nu)[z_i, k, c] sum_a U^(nu)[M, a1..a_nu, k] prod_t A_{i,c,a_t}``,
evaluated Horner-style from the highest degree down:
``acc <- (acc + U^(nu) W^(nu)) . A`` contracting one input index per step.

Each step first folds the weights into the coupling tensor, ``U W`` (once per element
present in the batch, or once for the element-agnostic product), then contracts it with
every atom's features as a batched mat-vec: the cost grows with atoms x channels x
(2L+1) D^nu, never with the number of paths K, and nothing of size atoms x D^nu x K is
materialised.

Weights are per element (MACE-MP-0) or one table shared by all elements (the MH-1
"element-agnostic product").
"""

from __future__ import annotations

import math

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

    def set_coupling(self, degree: int, coupling: torch.Tensor) -> None:
        """Adopt another (equally valid) coupling basis for one degree.

        Coupling tensors are data, not code: a checkpoint or a foundation model may carry
        another basis, e.g. mace-torch's non-reduced one with its own number of paths K.
        When K changes, the weights of that degree are re-initialised at the new shape.
        """
        current = self.coupling(degree)
        self.register_buffer(f"U_{degree}", coupling.detach().to(current).clone())
        weight = self.weights[degree - 1]
        k = coupling.shape[-1]
        if weight.shape[1] != k:
            shape = (weight.shape[0], k, weight.shape[2])
            fresh = torch.randn(shape, dtype=weight.dtype, device=weight.device)
            self.weights[degree - 1] = torch.nn.Parameter(fresh / max(k, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Adopt the coupling basis stored in the checkpoint before the strict copy."""
        for degree in range(1, self.correlation + 1):
            key = f"{prefix}U_{degree}"
            stored, current = state_dict.get(key), self.coupling(degree)
            if stored is None:
                continue
            if stored.shape != current.shape:
                self.set_coupling(degree, stored)
            elif torch.equal(stored, current.to(stored.dtype)):
                # Our own basis saved in lower precision: keep the exact one we computed.
                state_dict[key] = current
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, features: torch.Tensor, segments: list[tuple[int, int]] | None
    ) -> torch.Tensor:
        """``features`` [C, N, D] channel-major; returns [C, N, 2L+1].

        ``segments`` lists (element, atom count) for atoms sorted by element, or None for
        the element-agnostic product (one weight set for every atom).
        """
        c, n, d = features.shape
        acc: torch.Tensor | None = None  # [C, N, M * D^degree] carried down from above
        for degree in range(self.correlation, 0, -1):
            u = self.coupling(degree)  # [M, D^(degree-1), D, K]
            lead = math.prod(u.shape[:degree])  # M * D^(degree-1)
            step = self._weighted_step(u.reshape(lead * d, -1), degree, features, segments, lead)
            if acc is not None:
                carried = acc.view(c, n, lead, d) @ features.unsqueeze(-1)
                step = step + carried.squeeze(-1)
            acc = step
        return acc

    def _weighted_step(
        self,
        u: torch.Tensor,  # [M * D^(degree-1) * D, K]
        degree: int,
        features: torch.Tensor,
        segments: list[tuple[int, int]] | None,
        lead: int,
    ) -> torch.Tensor:
        """``sum_{i,k} U[a, i, k] W[z, k, c] A[c, n, i]`` -> [C, N, lead].

        ``U W`` is formed once per element present (cost independent of the number of
        atoms), then applied to that element's atoms as one batched matrix product.
        """
        c, n, d = features.shape
        weights = self.weights[degree - 1]
        if u.shape[-1] == 0:
            return features.new_zeros(c, n, lead)

        def folded(weight_set: int) -> torch.Tensor:  # [C, D, lead]
            return (u @ weights[weight_set]).view(lead, d, c).permute(2, 1, 0)

        if segments is None:
            return torch.bmm(features, folded(0))
        pieces, start = [], 0
        for element, count in segments:
            pieces.append(torch.bmm(features[:, start : start + count], folded(element)))
            start += count
        return torch.cat(pieces, dim=1)


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
        self.num_elements = num_elements
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
        """``features`` [N, C, D] from the interaction; returns [N, target_irreps.dim]."""
        if self.agnostic:
            out = self._contract(features, None)
        else:
            out = self._contract_by_element(features, node_elements)
        out = self.linear(out)
        return out if skip is None else out + skip

    def _contract(
        self, features: torch.Tensor, segments: list[tuple[int, int]] | None
    ) -> torch.Tensor:
        n = features.shape[0]
        channel_major = features.transpose(0, 1).contiguous()  # [C, N, D]
        parts = [
            c(channel_major, segments).transpose(0, 1).reshape(n, -1) for c in self.contractions
        ]
        return torch.cat(parts, dim=-1)

    @torch.compiler.disable
    def _contract_by_element(
        self, features: torch.Tensor, node_elements: torch.Tensor
    ) -> torch.Tensor:
        """Atoms sorted by element: each element's weights act on one contiguous block.

        The block sizes are data, so torch.compile runs this part eagerly instead of
        recompiling for every composition of a batch.
        """
        order = torch.argsort(node_elements, stable=True)
        counts = torch.bincount(node_elements, minlength=self.num_elements).tolist()
        segments = [(element, count) for element, count in enumerate(counts) if count]
        out = self._contract(features[order], segments)
        return out[torch.argsort(order)]
