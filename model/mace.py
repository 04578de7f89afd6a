"""The multi-head enhanced MACE: radial features, T interaction + product layers, readouts.

``E = sum_i ( E0[h, z_i] + s_h (sum_t E_i^(t) + V_ZBL,i) + mu_h )`` per structure, where h
is the structure's own head; forces and stress come from autograd through positions and
a symmetric strain (SCIENCE.md section 5). Structures with different heads share one
backbone pass.
"""

from __future__ import annotations

import torch
from e3nn import o3

from .config import ModelConfig
from .graph import GraphBatch
from .interaction import HAS_SKIP, INTERACTIONS
from .product import ProductBasis
from .radial import RadialEmbedding, ZBLRepulsion
from .readout import LinearReadout, NonLinearReadout


def layer_irreps(config: ModelConfig) -> list[dict[str, o3.Irreps | None]]:
    """Irreps of every layer, following MACE's layout.

    The first layer reads only scalar embeddings; the last keeps only scalars (its output
    feeds the energy readout alone); the middle layers carry the full hidden irreps.
    """
    hidden = o3.Irreps(config.hidden_irreps)
    channels = config.num_channels
    scalars = o3.Irreps(f"{channels}x0e")
    sh = o3.Irreps.spherical_harmonics(config.max_ell)
    interaction_irreps = (sh * channels).sort()[0].simplify()
    edge = o3.Irreps(config.edge_irreps) if config.edge_irreps is not None else None
    layers = []
    for t in range(config.num_layers):
        last = t == config.num_layers - 1
        if t == 0:
            edge_t = (
                o3.Irreps(f"{edge.count(o3.Irrep(0, 1))}x0e")
                if edge is not None and config.edge_irreps_first
                else None
            )
        else:
            edge_t = edge
        layers.append(
            {
                "node_feats": scalars if t == 0 else hidden,
                "target": interaction_irreps,
                "hidden_out": scalars if last else hidden,
                "edge": edge_t,
            }
        )
    return layers


def derivatives(
    energy: torch.Tensor,
    positions: torch.Tensor,
    strain: torch.Tensor | None,
    cell: torch.Tensor,
    training: bool = False,
) -> dict[str, torch.Tensor]:
    """Forces, and virials and stress when ``strain`` is given, from ``energy`` [B].

    ``training`` keeps the graph (create_graph) so that losses on forces backpropagate.
    """
    inputs = [positions] if strain is None else [positions, strain]
    grads = torch.autograd.grad(
        [energy],
        inputs,
        grad_outputs=[torch.ones_like(energy)],
        create_graph=training,
        retain_graph=training,
        allow_unused=True,
    )
    forces = grads[0] if grads[0] is not None else torch.zeros_like(positions)
    out = {"forces": -forces}
    if strain is not None:
        virial_grad = grads[1] if grads[1] is not None else torch.zeros_like(strain)
        volume = torch.linalg.det(cell).abs().view(-1, 1, 1)
        out["virials"] = -virial_grad
        out["stress"] = torch.where(volume > 0, virial_grad / volume.clamp_min(1e-30), 0.0)
    return out


def output_envelopes(config: ModelConfig) -> list[bool]:
    """Whether each layer's block multiplies its radial-network outputs by the envelope.

    Always when the Bessel features are not enveloped (``apply_cutoff=False``). With
    enveloped features, the bias-free e3nn networks of the sum-normalised blocks map the
    zero features at r_max to zero weights by themselves, so they need nothing more
    (mace-torch's semantics, kept for exact agreement). The non-linear block's radial
    MLP does not: its biases, LayerNorm and element embeddings give non-zero weights and
    densities at r_max, so its outputs are always enveloped unless the config asks to
    reproduce a discontinuous source (``reproduce_cutoff_jump``).
    """
    kinds = [config.interaction_first] + [config.interaction] * (config.num_layers - 1)
    return [
        not config.apply_cutoff or (kind == "nonlinear" and not config.reproduce_cutoff_jump)
        for kind in kinds
    ]


class CrossfieldMACE(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        heads = config.heads
        elements = config.num_elements
        self.register_buffer("atomic_numbers", torch.tensor(config.elements, dtype=torch.int64))
        self.register_buffer(
            "e0s", torch.tensor([h.e0s for h in heads], dtype=torch.get_default_dtype())
        )
        self.register_buffer(
            "scale", torch.tensor([h.scale for h in heads], dtype=torch.get_default_dtype())
        )
        self.register_buffer(
            "shift", torch.tensor([h.shift for h in heads], dtype=torch.get_default_dtype())
        )

        node_attrs = o3.Irreps(f"{elements}x0e")
        channels = config.num_channels
        self.node_embedding = o3.Linear(node_attrs, o3.Irreps(f"{channels}x0e"))
        self.radial_embedding = RadialEmbedding(
            config.r_max,
            config.num_bessel,
            config.cutoff_p,
            config.distance_transform,
            config.apply_cutoff,
        )
        self.pair_repulsion = (
            ZBLRepulsion(config.cutoff_p, None if config.reproduce_cutoff_jump else config.r_max)
            if config.pair_repulsion
            else None
        )
        sh_irreps = o3.Irreps.spherical_harmonics(config.max_ell)
        self.spherical_harmonics = o3.SphericalHarmonics(
            sh_irreps, normalize=True, normalization="component"
        )

        self.interactions = torch.nn.ModuleList()
        self.products = torch.nn.ModuleList()
        self.readouts = torch.nn.ModuleList()
        mlp = o3.Irreps(config.readout_mlp_irreps)
        for t, irreps in enumerate(layer_irreps(config)):
            kind = config.interaction_first if t == 0 else config.interaction
            self.interactions.append(
                INTERACTIONS[kind](
                    node_feats_irreps=irreps["node_feats"],
                    node_attrs_irreps=node_attrs,
                    sh_irreps=sh_irreps,
                    num_radial=config.num_bessel,
                    target_irreps=irreps["target"],
                    hidden_irreps=irreps["hidden_out"],
                    edge_irreps=irreps["edge"],
                    avg_num_neighbors=config.avg_num_neighbors,
                    radial_mlp=list(config.radial_mlp),
                )
            )
            self.products.append(
                ProductBasis(
                    irreps["target"],
                    irreps["hidden_out"],
                    config.correlation[t],
                    elements,
                    agnostic=config.product == "agnostic",
                )
            )
            last = t == config.num_layers - 1
            if last and config.num_layers > 1:
                self.readouts.append(NonLinearReadout(irreps["hidden_out"], mlp, config.num_heads))
            elif not config.last_readout_only:
                self.readouts.append(LinearReadout(irreps["hidden_out"], config.num_heads))
        self.skip_used = [
            t == 0 and HAS_SKIP[config.interaction_first] or t > 0 for t in range(config.num_layers)
        ]
        self.output_envelopes = output_envelopes(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.e0s.dtype

    def forward(
        self,
        batch: GraphBatch,
        compute_forces: bool = True,
        compute_stress: bool = False,
        training: bool = False,
        return_descriptors: bool = False,
    ) -> dict[str, torch.Tensor]:
        positions = batch.positions
        strain = None
        if compute_forces or compute_stress:
            positions = positions.detach().requires_grad_(True)
        if compute_stress:
            # dE/d(strain) at zero strain is the virial.
            strain = torch.zeros(
                batch.num_structures, 3, 3, dtype=positions.dtype, device=positions.device
            )
            strain.requires_grad_(True)
        energy, node_energy, features = self.strained_energy(batch, positions, strain)

        out = {"energy": energy, "node_energy": node_energy}
        if return_descriptors:
            out["descriptors"] = features
        if compute_forces or compute_stress:
            out.update(derivatives(energy, positions, strain, batch.cell, training))
        return out

    def strained_energy(
        self, batch: GraphBatch, positions: torch.Tensor, strain: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energies [B], atomic energies [N] and descriptors at ``positions``.

        With a ``strain`` [B, 3, 3], positions and cells are first deformed by its symmetric
        part. Forces and virials are the gradients of the energy with respect to the two
        arguments; ``forward`` takes them, and compiled backends (backends.py) trace this
        method alone and take them themselves.
        """
        cell = batch.cell
        if strain is not None:
            symmetric = 0.5 * (strain + strain.transpose(-1, -2))
            positions = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch.batch])
            cell = cell + torch.matmul(cell, symmetric)
        sender, receiver = batch.edge_index
        shifts = torch.einsum("ei,eij->ej", batch.unit_shifts, cell[batch.batch[sender]])
        vectors = positions[receiver] - positions[sender] + shifts
        lengths = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)

        node_heads = batch.heads[batch.batch]
        node_energy, features = self.atomic_energies(batch, vectors, lengths, node_heads)
        # The structure count from a shape, not ptr.numel(): a traced graph keeps shapes
        # symbolic but bakes in Python ints.
        energy = node_energy.new_zeros(cell.shape[0]).index_add_(0, batch.batch, node_energy)
        return energy, node_energy, features

    def atomic_energies(
        self,
        batch: GraphBatch,
        vectors: torch.Tensor,
        lengths: torch.Tensor,
        node_heads: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies (eV) and invariant descriptors from edge geometry."""
        elements = batch.node_elements
        node_attrs = torch.nn.functional.one_hot(elements, self.config.num_elements).to(
            vectors.dtype
        )
        z = self.atomic_numbers[elements]
        sender, receiver = batch.edge_index
        edge_attrs = self.spherical_harmonics(vectors)
        edge_feats, envelope = self.radial_embedding(lengths, z[sender], z[receiver])

        interaction_energy = torch.zeros_like(lengths[:, 0]).new_zeros(elements.shape[0])
        if self.pair_repulsion is not None:
            interaction_energy = self.pair_repulsion(
                lengths, z[sender], z[receiver], receiver, elements.shape[0]
            )

        node_feats = self.node_embedding(node_attrs)
        layer_features = []
        for interaction, product, skip_used, enveloped in zip(
            self.interactions, self.products, self.skip_used, self.output_envelopes
        ):
            message, skip = interaction(
                node_feats,
                node_attrs,
                edge_attrs,
                edge_feats,
                batch.edge_index,
                envelope if enveloped else None,
            )
            node_feats = product(message, elements, skip if skip_used else None)
            layer_features.append(node_feats)
        for t, readout in enumerate(self.readouts):
            features = layer_features[-1] if len(self.readouts) == 1 else layer_features[t]
            interaction_energy = interaction_energy + readout(features, node_heads)

        node_energy = (
            self.e0s[node_heads, elements]
            + self.scale[node_heads] * interaction_energy
            + self.shift[node_heads]
        )
        channels = self.config.num_channels
        descriptors = torch.cat([f[:, :channels] for f in layer_features], dim=-1)
        return node_energy, descriptors

    def descriptors(self, batch: GraphBatch) -> torch.Tensor:
        """Invariant per-atom descriptors (scalar channels of every layer), no gradients."""
        with torch.no_grad():
            return self.forward(batch, compute_forces=False, return_descriptors=True)["descriptors"]


def build_model(
    config: ModelConfig, seed: int | None = None, dtype: torch.dtype | None = None
) -> CrossfieldMACE:
    """A freshly initialised model; ``seed`` makes the initialisation reproducible.

    The model is constructed with ``dtype`` as the default dtype, so constants computed at
    construction (coupling tensors, Bessel frequencies) are exact in that precision rather
    than rounded through float32 and converted.
    """
    dtype = dtype or torch.get_default_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return CrossfieldMACE(config).to(dtype)
    finally:
        torch.set_default_dtype(previous)
