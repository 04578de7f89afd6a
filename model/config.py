"""The architecture of a Crossfield model as plain, JSON-able data.

A checkpoint stores this next to the weights, so a model can always be rebuilt without
executing code from the file. Validation happens here, once, with messages that name the
offending field: a wrong config should fail at build time, never as a shape error deep
inside a forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import ase.data
from e3nn import o3

INTERACTION_KINDS = ("plain", "residual", "density", "density_residual", "nonlinear")
"""Interaction blocks (SCIENCE.md section 3):

- ``plain``: average-neighbour normaliser, element information through a per-element
  selector applied to the message, no skip connection (mace ``RealAgnosticInteractionBlock``);
- ``residual``: average-neighbour normaliser, per-element skip connection (MACE-MP-0);
- ``density``: density normaliser with a per-element message selector;
- ``density_residual``: density normaliser with a per-element skip (MACE-OMAT-0 style);
- ``nonlinear``: the MH-1 block: element embeddings into a LayerNorm radial MLP,
  learnable density normalisation, gated messages, element-free skip.
"""

PRODUCT_KINDS = ("element", "agnostic")
DISTANCE_TRANSFORMS = ("none", "agnesi")
READOUT_ACTIVATIONS = ("silu",)


@dataclass
class HeadConfig:
    """One output head: one level of electronic-structure theory.

    ``e0s`` are the isolated-atom reference energies (eV), one per element of the model's
    element table, in that order. ``scale`` and ``shift`` map the network's dimensionless
    atomic energies to eV: ``E_i = e0[z_i] + scale * (network_i + zbl_i) + shift``.
    ``level_of_theory`` is free-form metadata (functional, basis, code, ...).

    ``elements`` is the head's *coverage*: the atomic numbers its training data held.
    The element table is shared by all heads, so a head can be asked about an element
    it never saw (its E0 is then 0 and its answer an extrapolation); the server refuses
    that unless the caller opts in. ``systems`` names the kinds of structure it was
    trained on (``molecule``, ``bulk``, ``slab_adsorbate``, ...). ``None``: unknown
    (e.g. imported models), and then nothing is refused.
    """

    name: str
    e0s: list[float]
    scale: float = 1.0
    shift: float = 0.0
    level_of_theory: dict[str, Any] = field(default_factory=dict)
    elements: list[int] | None = None
    systems: list[str] | None = None


@dataclass
class ModelConfig:
    """Hyperparameters of the enhanced multi-head MACE (see SCIENCE.md for the equations).

    ``apply_cutoff`` says where the polynomial envelope goes: on the Bessel features
    (true) or on the radial networks' outputs (false). Either way every edge quantity
    that reaches the energy vanishes smoothly at ``r_max``: blocks whose radial network
    is not zero-preserving (``nonlinear``: biases, LayerNorm, element embeddings) always
    envelope their outputs too, and the ZBL switch radius never exceeds ``r_max``.
    ``reproduce_cutoff_jump`` turns both of those off, to reproduce exactly a mace-torch
    model that is itself discontinuous at r_max; only ``import-mace`` sets it, and
    training refuses it (:func:`cutoff_jump_sources` says why a source would jump).
    """

    elements: list[int]
    heads: list[HeadConfig]
    r_max: float = 5.0
    num_bessel: int = 8
    cutoff_p: int = 5
    distance_transform: str = "none"
    pair_repulsion: bool = False
    apply_cutoff: bool = True
    reproduce_cutoff_jump: bool = False
    max_ell: int = 3
    hidden_irreps: str = "32x0e+32x1o"
    edge_irreps: str | None = None
    edge_irreps_first: bool = False
    num_layers: int = 2
    correlation: list[int] = field(default_factory=lambda: [3, 3])
    interaction_first: str = "residual"
    interaction: str = "residual"
    product: str = "element"
    radial_mlp: list[int] = field(default_factory=lambda: [64, 64, 64])
    readout_mlp_irreps: str = "16x0e"
    readout_activation: str = "silu"
    last_readout_only: bool = False
    avg_num_neighbors: float = 10.0

    def __post_init__(self) -> None:
        self.heads = [h if isinstance(h, HeadConfig) else HeadConfig(**h) for h in self.heads]
        if isinstance(self.correlation, int):
            self.correlation = [self.correlation] * self.num_layers
        self.elements = [int(z) for z in self.elements]
        self.validate()

    # -- derived quantities -------------------------------------------------------------
    @property
    def num_elements(self) -> int:
        return len(self.elements)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def head_names(self) -> list[str]:
        return [h.name for h in self.heads]

    @property
    def num_channels(self) -> int:
        return o3.Irreps(self.hidden_irreps).count(o3.Irrep(0, 1))

    def head_index(self, name: str) -> int:
        try:
            return self.head_names.index(name)
        except ValueError:
            raise KeyError(
                f"unknown head {name!r}; this model has heads {self.head_names}"
            ) from None

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}")
        return cls(**data)

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"invalid model config: {name}: {message}")

        if not self.elements:
            fail("elements", "the element table is empty")
        if len(set(self.elements)) != len(self.elements):
            fail("elements", f"duplicated atomic numbers in {self.elements}")
        if any(not 1 <= z <= 118 for z in self.elements):
            fail("elements", f"atomic numbers must lie in 1..118, got {self.elements}")
        if not self.heads:
            fail("heads", "a model needs at least one head")
        names = self.head_names
        if len(set(names)) != len(names):
            fail("heads", f"duplicated head names in {names}")
        for head in self.heads:
            if not head.name or not isinstance(head.name, str):
                fail("heads", f"head name must be a non-empty string, got {head.name!r}")
            if head.elements is not None:
                head.elements = sorted(int(z) for z in head.elements)
                outside = sorted(set(head.elements) - set(self.elements))
                if outside:
                    fail(
                        f"heads[{head.name}].elements",
                        f"{_symbols(outside)} are not in the model's element table",
                    )
            if len(head.e0s) != self.num_elements:
                fail(
                    f"heads[{head.name}].e0s",
                    f"needs one value per element ({self.num_elements}), got {len(head.e0s)}",
                )
        if not self.r_max > 0:
            fail("r_max", f"must be positive, got {self.r_max}")
        if self.num_bessel < 1:
            fail("num_bessel", f"must be >= 1, got {self.num_bessel}")
        if self.cutoff_p < 1:
            fail("cutoff_p", f"must be >= 1, got {self.cutoff_p}")
        if self.distance_transform not in DISTANCE_TRANSFORMS:
            fail("distance_transform", f"must be one of {DISTANCE_TRANSFORMS}")
        if not 0 <= self.max_ell <= 4:
            fail("max_ell", f"must lie in 0..4, got {self.max_ell}")
        if self.num_layers < 1:
            fail("num_layers", f"must be >= 1, got {self.num_layers}")
        if len(self.correlation) != self.num_layers:
            fail("correlation", f"needs one value per layer ({self.num_layers})")
        if any(not 1 <= c <= 3 for c in self.correlation):
            fail("correlation", f"each value must lie in 1..3, got {self.correlation}")
        for name in ("interaction_first", "interaction"):
            if getattr(self, name) not in INTERACTION_KINDS:
                fail(name, f"must be one of {INTERACTION_KINDS}, got {getattr(self, name)!r}")
        if self.product not in PRODUCT_KINDS:
            fail("product", f"must be one of {PRODUCT_KINDS}, got {self.product!r}")
        if self.readout_activation not in READOUT_ACTIVATIONS:
            fail("readout_activation", f"must be one of {READOUT_ACTIVATIONS}")
        try:
            hidden = o3.Irreps(self.hidden_irreps)
        except (ValueError, AssertionError) as err:
            fail("hidden_irreps", f"cannot parse {self.hidden_irreps!r}: {err}")
        muls = {mul for mul, _ in hidden}
        if len(muls) != 1 or hidden.count(o3.Irrep(0, 1)) == 0:
            fail("hidden_irreps", f"needs 0e and one multiplicity for every irrep, got {hidden}")
        if any(ir.p != (-1) ** ir.l for _, ir in hidden):
            fail("hidden_irreps", f"only natural-parity irreps (0e, 1o, 2e, ...), got {hidden}")
        if hidden.lmax > self.max_ell:
            fail("hidden_irreps", f"L={hidden.lmax} exceeds max_ell={self.max_ell}")
        if self.edge_irreps is not None:
            try:
                o3.Irreps(self.edge_irreps)
            except (ValueError, AssertionError) as err:
                fail("edge_irreps", f"cannot parse {self.edge_irreps!r}: {err}")
        if not self.radial_mlp or any(w < 1 for w in self.radial_mlp):
            fail("radial_mlp", f"needs positive layer widths, got {self.radial_mlp}")
        try:
            mlp = o3.Irreps(self.readout_mlp_irreps)
        except (ValueError, AssertionError) as err:
            fail("readout_mlp_irreps", f"cannot parse {self.readout_mlp_irreps!r}: {err}")
        if mlp.lmax != 0:
            fail("readout_mlp_irreps", f"must be scalars, got {mlp}")
        if not self.avg_num_neighbors > 0:
            fail("avg_num_neighbors", f"must be positive, got {self.avg_num_neighbors}")
        if self.reproduce_cutoff_jump and not cutoff_jump_sources(self):
            fail(
                "reproduce_cutoff_jump",
                "this architecture has no cutoff jump to reproduce (it needs "
                "interaction=nonlinear with apply_cutoff=true, or pair_repulsion with "
                "element pairs whose covalent radii add up to r_max or more)",
            )


def _symbols(numbers: list[int]) -> str:
    return ", ".join(ase.data.chemical_symbols[z] for z in numbers)


def cutoff_jump_sources(config: ModelConfig) -> list[str]:
    """What would make the energy jump at r_max under mace-torch's semantics.

    mace-torch multiplies a block's radial-network outputs by the envelope only when
    ``apply_cutoff`` is false, and switches ZBL off at the pair's covalent radii sum
    even beyond r_max. Crossfield models are smooth regardless (see ``ModelConfig``);
    this list names the config fields behind each jump that ``reproduce_cutoff_jump``
    would reproduce, for import-mace's warning and for validation.
    """
    sources = []
    kinds = {config.interaction_first, config.interaction}
    if config.apply_cutoff and "nonlinear" in kinds:
        sources.append(
            "interaction=nonlinear with apply_cutoff=true: the radial MLP (biases, "
            "LayerNorm, element embeddings) is not enveloped, so tensor-product weights "
            "and densities are non-zero at r_max"
        )
    if config.pair_repulsion:
        radii = {z: float(ase.data.covalent_radii[z]) for z in config.elements}
        pairs = [
            f"{ase.data.chemical_symbols[a]}-{ase.data.chemical_symbols[b]}"
            for i, a in enumerate(config.elements)
            for b in config.elements[i:]
            if radii[a] + radii[b] >= config.r_max
        ]
        if pairs:
            sources.append(
                f"pair_repulsion: the ZBL switch radius (sum of covalent radii) reaches "
                f"r_max={config.r_max} for {', '.join(pairs[:10])}"
                + (f" and {len(pairs) - 10} more pairs" if len(pairs) > 10 else "")
            )
    return sources
