"""Interaction blocks: equivariant messages from neighbours (SCIENCE.md section 3).

Every block shares one convolution: ``h~_j = Linear_up(h_j)``,
``m_ij = TP_uvu(h~_j, Y(r_ij); R(edge features))``, ``sum_j m_ij`` on the receiver.
They differ in how element information enters, how the sum is normalised, and whether a
skip connection is returned to be added after the product basis:

==================  =========================  ===========================  ================
kind                normaliser                 element information          skip
==================  =========================  ===========================  ================
plain               avg_num_neighbors          selector on the message      none
residual            avg_num_neighbors          per-element skip TP          Linear(h x z)
density             rho_i + 1                  selector on the message      none
density_residual    rho_i + 1                  per-element skip TP          Linear(h x z)
nonlinear (MH-1)    beta rho_i + alpha         embeddings in the radial MLP element-free Linear
==================  =========================  ===========================  ================

All outputs are reshaped to [atoms, channels, sum(2l+1)] for the product basis.
"""

from __future__ import annotations

import torch
from e3nn import nn, o3

from .gate import GatedNonlinearity


def convolution_irreps(
    irreps_in: o3.Irreps, irreps_edge: o3.Irreps, target: o3.Irreps
) -> tuple[o3.Irreps, list[tuple[int, int, int, str, bool]]]:
    """Output irreps and "uvu" instructions of the message tensor product.

    Every (input, edge) pair that can produce an irrep of ``target`` gets its own path
    and weight; outputs are sorted by irrep so the following Linear sees them grouped.
    """
    outputs: list[tuple[int, o3.Irrep]] = []
    instructions = []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_edge) in enumerate(irreps_edge):
            for ir_out in ir_in * ir_edge:
                if ir_out in target:
                    instructions.append((i, j, len(outputs), "uvu", True))
                    outputs.append((mul, ir_out))
    irreps_out, permutation, _ = o3.Irreps(outputs).sort()
    instructions = sorted(
        ((i, j, permutation[k], mode, train) for i, j, k, mode, train in instructions),
        key=lambda instruction: instruction[2],
    )
    return irreps_out, instructions


def to_channels(x: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """[N, mul_ir flat] -> [N, C, sum(2l+1)] for (mul, 2l+1) blocks of one multiplicity C.

    Blocks are plain ints rather than an ``o3.Irreps``: torch.compile guards on what the
    forward pass reads, and it cannot guard on e3nn's Irrep tuples.
    """
    n = x.shape[0]
    parts, start = [], 0
    for mul, dim in blocks:
        parts.append(x[:, start : start + mul * dim].reshape(n, mul, dim))
        start += mul * dim
    return torch.cat(parts, dim=-1)


class RadialMLP(torch.nn.Sequential):
    """Linear -> LayerNorm -> SiLU stack (MH-1's radial network, as in eSEN/FairChem)."""

    def __init__(self, widths: list[int]) -> None:
        layers: list[torch.nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(torch.nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                layers += [torch.nn.LayerNorm(width_out), torch.nn.SiLU()]
        super().__init__(*layers)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    out = src.new_zeros((num, *src.shape[1:]))
    return out.index_add_(0, index, src)


class InteractionBlock(torch.nn.Module):
    """The convolution that all kinds share; subclasses add normalisation and skips."""

    kind = ""

    def __init__(
        self,
        node_feats_irreps: o3.Irreps,
        node_attrs_irreps: o3.Irreps,
        sh_irreps: o3.Irreps,
        num_radial: int,
        target_irreps: o3.Irreps,
        hidden_irreps: o3.Irreps,
        edge_irreps: o3.Irreps | None,
        avg_num_neighbors: float,
        radial_mlp: list[int],
    ) -> None:
        super().__init__()
        self.node_feats_irreps = node_feats_irreps
        self.node_attrs_irreps = node_attrs_irreps
        self.target_irreps = target_irreps
        self.target_blocks = [(mul, ir.dim) for mul, ir in target_irreps]
        self.hidden_irreps = hidden_irreps
        self.edge_irreps = edge_irreps if edge_irreps is not None else node_feats_irreps
        self.avg_num_neighbors = avg_num_neighbors
        self.linear_up = o3.Linear(node_feats_irreps, self.edge_irreps)
        self.message_irreps, instructions = convolution_irreps(
            self.edge_irreps, sh_irreps, target_irreps
        )
        self.conv_tp = o3.TensorProduct(
            self.edge_irreps,
            sh_irreps,
            self.message_irreps,
            instructions=instructions,
            shared_weights=False,
            internal_weights=False,
        )
        # Another implementation of ``convolve`` (model/backends_cueq.py), or None for e3nn.
        self.fused_convolution: torch.nn.Module | None = None
        self.build(num_radial, radial_mlp)

    def build(self, num_radial: int, radial_mlp: list[int]) -> None:
        raise NotImplementedError

    def convolve(
        self,
        node_feats_up: torch.Tensor,
        edge_attrs: torch.Tensor,
        tp_weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        if self.fused_convolution is not None:
            return self.fused_convolution(node_feats_up, edge_attrs, tp_weights, edge_index)
        messages = self.conv_tp(node_feats_up[edge_index[0]], edge_attrs, tp_weights)
        return scatter_sum(messages, edge_index[1], node_feats_up.shape[0])


class _SumNormalisedBlock(InteractionBlock):
    """Blocks whose radial network sees only the edge's radial features (MP-0, OMAT-0)."""

    density = False
    residual = False

    def build(self, num_radial: int, radial_mlp: list[int]) -> None:
        self.radial = nn.FullyConnectedNet(
            [num_radial, *radial_mlp, self.conv_tp.weight_numel], torch.nn.functional.silu
        )
        self.linear = o3.Linear(self.message_irreps, self.target_irreps)
        if self.residual:
            self.skip = o3.FullyConnectedTensorProduct(
                self.node_feats_irreps, self.node_attrs_irreps, self.hidden_irreps
            )
        else:
            self.skip = o3.FullyConnectedTensorProduct(
                self.target_irreps, self.node_attrs_irreps, self.target_irreps
            )
        if self.density:
            self.density_net = nn.FullyConnectedNet([num_radial, 1], torch.nn.functional.silu)

    def forward(
        self,
        node_feats: torch.Tensor,
        node_attrs: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        envelope: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_atoms = node_feats.shape[0]
        skip = self.skip(node_feats, node_attrs) if self.residual else None
        up = self.linear_up(node_feats)
        tp_weights = self.radial(edge_feats)
        if envelope is not None:
            tp_weights = tp_weights * envelope
        message = self.convolve(up, edge_attrs, tp_weights, edge_index)
        if self.density:
            edge_density = torch.tanh(self.density_net(edge_feats) ** 2)
            if envelope is not None:
                edge_density = edge_density * envelope
            message = self.linear(message) / (
                scatter_sum(edge_density, edge_index[1], num_atoms) + 1
            )
        else:
            message = self.linear(message) / self.avg_num_neighbors
        if not self.residual:
            message = self.skip(message, node_attrs)
        return to_channels(message, self.target_blocks), skip


class PlainInteraction(_SumNormalisedBlock):
    kind = "plain"


class ResidualInteraction(_SumNormalisedBlock):
    kind = "residual"
    residual = True


class DensityInteraction(_SumNormalisedBlock):
    kind = "density"
    density = True


class DensityResidualInteraction(_SumNormalisedBlock):
    kind = "density_residual"
    density = True
    residual = True


class NonLinearInteraction(InteractionBlock):
    """The MH-1 block: element embeddings feed a shared radial network; gated messages.

    Element information enters only through learned source/target embeddings (as wide as
    the scalar channels) concatenated with the radial basis, so every weight of the block
    is shared across elements. The message sum is normalised by ``beta rho_i + alpha``
    (alpha = 20, beta = 0 at initialisation: a fixed normaliser that training can turn
    into a learned local density), a linear residual of ``h~_i`` is added, and a gate
    (SiLU on scalars, sigmoid gates on l > 0) makes the product basis non-linear.
    """

    kind = "nonlinear"

    def build(self, num_radial: int, radial_mlp: list[int]) -> None:
        scalars = o3.Irreps([(self.node_feats_irreps.count(o3.Irrep(0, 1)), (0, 1))])
        self.source_embedding = o3.Linear(self.node_attrs_irreps, scalars)
        self.target_embedding = o3.Linear(self.node_attrs_irreps, scalars)
        torch.nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
        torch.nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        width_in = num_radial + 2 * scalars.dim
        self.radial = RadialMLP([width_in, *radial_mlp, self.conv_tp.weight_numel])
        self.density_net = RadialMLP([width_in, 64, 1])
        self.skip = o3.Linear(self.node_feats_irreps, self.hidden_irreps)
        self.gate = GatedNonlinearity(self.target_irreps)
        self.linear_residual = o3.Linear(self.edge_irreps, self.gate.irreps_in)
        self.linear_message = o3.Linear(self.message_irreps, self.gate.irreps_in)
        self.linear_out = o3.Linear(self.target_irreps, self.target_irreps)
        self.alpha = torch.nn.Parameter(torch.tensor(20.0))
        self.beta = torch.nn.Parameter(torch.tensor(0.0))

    def forward(
        self,
        node_feats: torch.Tensor,
        node_attrs: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_feats: torch.Tensor,
        edge_index: torch.Tensor,
        envelope: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_atoms = node_feats.shape[0]
        sender, receiver = edge_index
        skip = self.skip(node_feats)
        up = self.linear_up(node_feats)
        residual = self.linear_residual(up)
        edge_inputs = torch.cat(
            [
                edge_feats,
                self.source_embedding(node_attrs)[sender],
                self.target_embedding(node_attrs)[receiver],
            ],
            dim=-1,
        )
        tp_weights = self.radial(edge_inputs)
        edge_density = torch.tanh(self.density_net(edge_inputs) ** 2)
        if envelope is not None:
            tp_weights = tp_weights * envelope
            edge_density = edge_density * envelope
        density = scatter_sum(edge_density, receiver, num_atoms)
        message = self.convolve(up, edge_attrs, tp_weights, edge_index)
        message = self.linear_message(message) / (density * self.beta + self.alpha) + residual
        message = self.linear_out(self.gate(message))
        return to_channels(message, self.target_blocks), skip


INTERACTIONS: dict[str, type[InteractionBlock]] = {
    cls.kind: cls
    for cls in (
        PlainInteraction,
        ResidualInteraction,
        DensityInteraction,
        DensityResidualInteraction,
        NonLinearInteraction,
    )
}

HAS_SKIP = {
    "plain": False,
    "residual": True,
    "density": False,
    "density_residual": True,
    "nonlinear": True,
}
