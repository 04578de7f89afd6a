"""Convert mace-torch ``MACE`` / ``ScaleShiftMACE`` models into Crossfield models.

Works on a live mace module or on the object tree that ``mace_file.read_mace_file``
recovers from a ``.model`` pickle without executing its code: both expose the same
``__dict__`` (``_modules``, ``_parameters``, ``_buffers`` and plain attributes), which is
all this module reads. The architecture is inferred from attributes and tensor shapes;
anything we do not implement is refused with ``UnsupportedMaceModelError`` naming the feature,
never converted into a silently different model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import HeadConfig, ModelConfig, cutoff_jump_sources
from .mace import CrossfieldMACE, build_model

INTERACTION_CLASSES = {
    "RealAgnosticInteractionBlock": "plain",
    "RealAgnosticResidualInteractionBlock": "residual",
    "RealAgnosticDensityInteractionBlock": "density",
    "RealAgnosticDensityResidualInteractionBlock": "density_residual",
    "RealAgnosticResidualNonLinearInteractionBlock": "nonlinear",
}
MODEL_CLASSES = ("MACE", "ScaleShiftMACE")


class UnsupportedMaceModelError(ValueError):
    """The mace-torch model uses a feature Crossfield does not implement."""


# -- uniform access to live modules and unpickled stand-ins ------------------------------
def _name(obj: Any) -> str:
    return type(obj).__name__


def _modules(obj: Any) -> dict[str, Any]:
    return vars(obj).get("_modules", {})


def _child(obj: Any, name: str) -> Any | None:
    return _modules(obj).get(name)


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    return vars(obj).get(name, default)


def _tensor(obj: Any, name: str) -> torch.Tensor | None:
    for table in ("_parameters", "_buffers"):
        value = vars(obj).get(table, {}).get(name)
        if value is not None:
            return value
    return None


def mace_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the tree, with dotted names as in ``state_dict``."""
    out: dict[str, torch.Tensor] = {}
    for table in ("_parameters", "_buffers"):
        for key, value in vars(obj).get(table, {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + key] = value.detach()
    for key, child in _modules(obj).items():
        if child is not None:
            out.update(mace_state_dict(child, f"{prefix}{key}."))
    return out


def _refuse(feature: str) -> None:
    raise UnsupportedMaceModelError(f"unsupported mace-torch feature: {feature}")


# -- architecture --------------------------------------------------------------------------
def config_from_mace(model: Any) -> ModelConfig:
    if _name(model) not in MODEL_CLASSES:
        _refuse(f"model class {_name(model)} (supported: {', '.join(MODEL_CLASSES)})")
    if _child(model, "joint_embedding") is not None:
        _refuse("embedding_specs (joint embeddings of extra features)")
    if _attr(model, "use_so3", False):
        _refuse("use_so3=True")
    first_block = _child(_child(model, "interactions"), "0")
    for config_name in ("cueq_config", "oeq_config"):
        accelerated = _attr(first_block, config_name)
        if accelerated is not None and _attr(accelerated, "enabled", False):
            _refuse(
                f"{config_name} (convert the model back to e3nn layout with mace's tools first)"
            )

    elements = [int(z) for z in _tensor(model, "atomic_numbers").tolist()]
    heads = list(_attr(model, "heads", None) or ["Default"])
    num_heads = len(heads)

    radial = _child(model, "radial_embedding")
    bessel = _child(radial, "bessel_fn")
    if _name(bessel) != "BesselBasis":
        _refuse(f"radial_type {_name(bessel)} (only the Bessel basis is implemented)")
    if _tensor(bessel, "bessel_weights") is None or "bessel_weights" in vars(bessel).get(
        "_parameters", {}
    ):
        _refuse("trainable Bessel frequencies")
    transform = _child(radial, "distance_transform")
    if transform is not None and _name(transform) != "AgnesiTransform":
        _refuse(f"distance_transform {_name(transform)} (only Agnesi is implemented)")
    if transform is not None and any(
        k in vars(transform).get("_parameters", {}) for k in ("a", "p", "q")
    ):
        _refuse("trainable Agnesi transform")
    pair = _child(model, "pair_repulsion_fn") if _attr(model, "pair_repulsion", False) else None
    if pair is not None and "a_exp" in vars(pair).get("_parameters", {}):
        _refuse("trainable ZBL parameters")

    interactions = list(_modules(_child(model, "interactions")).values())
    products = list(_modules(_child(model, "products")).values())
    readouts = list(_modules(_child(model, "readouts")).values())
    kinds = []
    for block in interactions:
        if _name(block) not in INTERACTION_CLASSES:
            _refuse(f"interaction block {_name(block)}")
        kinds.append(INTERACTION_CLASSES[_name(block)])
    if len(set(kinds[1:])) > 1:
        _refuse(f"different interaction classes after the first layer: {kinds}")
    avg = {float(_attr(block, "avg_num_neighbors")) for block in interactions}
    if len(avg) != 1:
        _refuse(f"per-layer avg_num_neighbors {sorted(avg)}")

    # Irreps from the product basis: one contraction per hidden irrep, U_matrix_1 is [2L+1, D, 1].
    def contraction_ls(product: Any) -> list[int]:
        contractions = _modules(
            _child(_child(product, "symmetric_contractions"), "contractions")
        ).values()
        ls = []
        for contraction in contractions:
            u1 = _tensor(contraction, "U_matrix_1")
            ls.append(0 if u1.dim() == 2 else (u1.shape[0] - 1) // 2)
        return ls

    first_contraction = next(
        iter(
            _modules(_child(_child(products[0], "symmetric_contractions"), "contractions")).values()
        )
    )
    coupling_dim = _tensor(first_contraction, "U_matrix_1").shape[-2]
    max_ell = round(math.sqrt(coupling_dim)) - 1
    if (max_ell + 1) ** 2 != coupling_dim:
        _refuse("hidden irreps with odd-parity scalars (0o) or non-standard coupling irreps")
    channels = _tensor(first_contraction, "weights_max").shape[-1]
    num_layers = len(interactions)
    hidden_ls = contraction_ls(products[0]) if num_layers > 1 else [0]
    if contraction_ls(products[-1]) != [0]:
        _refuse("keep_last_layer_irreps=True (non-scalar last layer)")
    if hidden_ls != list(range(len(hidden_ls))):
        _refuse(f"hidden irreps with L = {hidden_ls} (need 0, 1, 2, ... in order)")
    irrep_types = [f"{l}{'e' if l % 2 == 0 else 'o'}" for l in hidden_ls]
    hidden_irreps = "+".join(f"{channels}x{t}" for t in irrep_types)

    correlation = []
    for product in products:
        contraction = next(
            iter(
                _modules(_child(_child(product, "symmetric_contractions"), "contractions")).values()
            )
        )
        correlation.append(
            sum(1 for k in vars(contraction)["_buffers"] if k.startswith("U_matrix_"))
        )
    agnostic = {bool(_attr(p, "use_agnostic_product", False)) for p in products}
    if len(agnostic) != 1:
        _refuse("element-agnostic product in some layers only")

    edge_irreps, edge_first = None, False
    if num_layers > 1:
        up = _tensor(_child(interactions[1], "linear_up"), "weight").numel()
        width = up // (channels * len(irrep_types))
        if width != channels:
            edge_irreps = "+".join(f"{width}x{t}" for t in irrep_types)
    first_up = _tensor(_child(interactions[0], "linear_up"), "weight").numel() // channels
    if first_up != channels:
        if edge_irreps is None or first_up != int(edge_irreps.split("x")[0]):
            _refuse("first-layer edge irreps that differ from the other layers")
        edge_first = True

    last_readout_only = bool(_attr(model, "use_last_readout_only", False))
    for index, readout in enumerate(readouts):
        expected = (
            "NonLinearReadoutBlock"
            if index == len(readouts) - 1 and num_layers > 1
            else "LinearReadoutBlock"
        )
        if _name(readout) != expected:
            _refuse(f"readout {index} is {_name(readout)} (expected {expected})")
    mlp_width = 16
    if num_layers > 1:
        nonlinear = readouts[-1]
        mlp_width = _tensor(_child(nonlinear, "linear_1"), "weight").numel() // (
            channels * num_heads
        )
        activation = _child(nonlinear, "non_linearity")
        for act in _modules(_child(activation, "acts")).values():
            function = _attr(act, "f")
            function_name = getattr(function, "__name__", _name(function))
            if function_name != "silu":
                _refuse(f"readout gate {function_name} (only silu is implemented)")

    e0s = _tensor(_child(model, "atomic_energies_fn"), "atomic_energies").to(torch.float64)
    e0s = e0s.reshape(-1, len(elements)).expand(num_heads, -1)
    scale = torch.ones(num_heads, dtype=torch.float64)
    shift = torch.zeros(num_heads, dtype=torch.float64)
    scale_shift = _child(model, "scale_shift")
    if scale_shift is not None:
        scale = _tensor(scale_shift, "scale").to(torch.float64).reshape(-1).expand(num_heads)
        shift = _tensor(scale_shift, "shift").to(torch.float64).reshape(-1).expand(num_heads)

    radial_mlp = list(_attr(interactions[0], "radial_MLP", [64, 64, 64]))
    cutoff = _child(radial, "cutoff_fn")
    config = ModelConfig(
        elements=elements,
        heads=[
            HeadConfig(
                name=name,
                e0s=e0s[h].tolist(),
                scale=float(scale[h]),
                shift=float(shift[h]),
                level_of_theory={"source": "mace-torch", "mace_head": name},
            )
            for h, name in enumerate(heads)
        ],
        r_max=float(_tensor(model, "r_max")),
        num_bessel=int(_tensor(bessel, "bessel_weights").numel()),
        cutoff_p=int(_tensor(cutoff, "p")),
        distance_transform="agnesi" if transform is not None else "none",
        pair_repulsion=pair is not None,
        apply_cutoff=bool(_attr(radial, "apply_cutoff", True)),
        max_ell=max_ell,
        hidden_irreps=hidden_irreps,
        edge_irreps=edge_irreps,
        edge_irreps_first=edge_first,
        num_layers=num_layers,
        correlation=correlation,
        interaction_first=kinds[0],
        interaction=kinds[-1],
        product="agnostic" if agnostic.pop() else "element",
        radial_mlp=radial_mlp,
        readout_mlp_irreps=f"{mlp_width}x0e",
        last_readout_only=last_readout_only,
        avg_num_neighbors=avg.pop(),
    )
    # mace-torch's semantics, reproduced exactly: import-mace reports the jump it measures.
    config.reproduce_cutoff_jump = bool(cutoff_jump_sources(config))
    return config


# -- weights ---------------------------------------------------------------------------------
_BLOCK_RENAMES = {
    "radial": "conv_tp_weights",
    "density_net": "density_fn",
    "skip": "skip_tp",
    "linear_message": "linear_1",
    "linear_out": "linear_2",
    "linear_residual": "linear_res",
}
_FIXED = {
    "node_embedding": "node_embedding.linear",
    "radial_embedding.bessel.frequencies": "radial_embedding.bessel_fn.bessel_weights",
    "radial_embedding.bessel.prefactor": "radial_embedding.bessel_fn.prefactor",
    "radial_embedding.cutoff.r_max": "radial_embedding.cutoff_fn.r_max",
    "radial_embedding.transform": "radial_embedding.distance_transform",
    "pair_repulsion.coefficients": "pair_repulsion_fn.c",
    "pair_repulsion": "pair_repulsion_fn",
}


def _source_key(key: str, config: ModelConfig) -> str | None:
    """The mace-torch name of one of our state_dict entries (None: ours is derived)."""
    parts = key.split(".")
    if parts[0] in ("e0s", "scale", "shift", "atomic_numbers") or key == "pair_repulsion.exponents":
        return None
    for ours, theirs in _FIXED.items():
        if key == ours or key.startswith(ours + "."):
            return theirs + key[len(ours) :]
    if parts[0] == "interactions":
        kind = config.interaction_first if parts[1] == "0" else config.interaction
        block_key = parts[2]
        if block_key in _BLOCK_RENAMES:
            parts[2] = _BLOCK_RENAMES[block_key]
            if kind == "nonlinear" and block_key in ("radial", "density_net"):
                parts.insert(3, "net")
        return ".".join(parts)
    if parts[0] == "products" and parts[2] == "contractions":
        layer, index = parts[1], parts[3]
        base = f"products.{layer}.symmetric_contractions.contractions.{index}"
        if parts[4].startswith("U_"):
            return f"{base}.U_matrix_{parts[4][2:]}"
        degree = int(parts[5]) + 1
        correlation = config.correlation[int(layer)]
        return (
            f"{base}.weights_max"
            if degree == correlation
            else f"{base}.weights.{correlation - 1 - degree}"
        )
    return key


def convert_mace(model: Any, dtype: torch.dtype = torch.float64) -> CrossfieldMACE:
    """A Crossfield model with the mace-torch model's architecture and weights."""
    config = config_from_mace(model)
    source = mace_state_dict(model)
    ours = build_model(config, dtype=dtype)
    state = ours.state_dict()
    missing = []
    for key in list(state):
        if key.endswith("output_mask") or "._compiled_main" in key:
            continue  # derived by e3nn from the irreps; ours are built the same way
        name = _source_key(key, config)
        if name is None:
            continue
        if name not in source:
            missing.append(name)
            continue
        value = source[name]
        if key.split(".")[-1].startswith("U_") and value.dim() == state[key].dim() - 1:
            value = value.unsqueeze(0)  # mace squeezes the M axis of scalar outputs
        state[key] = value.to(dtype)
    if missing:
        raise UnsupportedMaceModelError(f"mace-torch model lacks expected tensors: {missing[:5]}")
    ours.load_state_dict(state, strict=True)
    return ours.eval()
