"""Model surgery: a model with other heads and another element table, from an existing one.

:func:`transplant` builds the model of a new :class:`ModelConfig` and fills it from a
source model, parameter by parameter:

- element-indexed weights (the one-hot node embedding, the MH-1 source/target
  embeddings, the per-element skip / message-selector tensor products, the per-element
  product-basis tables) are restricted or re-ordered to the new element table; elements
  the source does not know keep the new model's fresh initialisation;
- readouts are per head: every new head copies the column (linear readout) or hidden
  block (non-linear readout) of the source head it is mapped to, or keeps its fresh
  weights when mapped to nothing;
- E0s, scale and shift come from the new config; every other weight and buffer (radial
  network, convolution, product linear maps, coupling tensors, ...) is copied unchanged.

e3nn normalises its linear maps and tensor products by the fan-in, which depends on the
number of elements (one-hot inputs) and heads (the second readout layer). Each copied
weight block is therefore rescaled by ``source path weight / target path weight``, so the
transplanted model computes exactly what the source computed for every retained element
and head (checked in tests/test_training_surgery.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from e3nn import o3

from crossfield.model import CrossfieldMACE, ModelConfig, build_model
from crossfield.model.product import ProductBasis, SymmetricContraction
from crossfield.model.readout import LinearReadout, NonLinearReadout

# Linear maps whose input is the one-hot element encoding (rows indexed by element).
_ELEMENT_LINEARS = ("node_embedding", "source_embedding", "target_embedding")
# Buffers that the new config defines rather than the source model.
_CONFIG_BUFFERS = ("atomic_numbers", "e0s", "scale", "shift")


def transplant(
    source: CrossfieldMACE,
    config: ModelConfig,
    head_sources: Sequence[str | None],
    seed: int | None = None,
) -> CrossfieldMACE:
    """A model of ``config`` whose weights come from ``source`` where they can.

    ``head_sources[h]`` names the source head whose readout the new head ``h`` copies
    (``None``: fresh readout). The architecture other than elements and heads must match.
    """
    _check_compatible(source.config, config)
    if len(head_sources) != config.num_heads:
        raise ValueError(
            f"head_sources: needs one entry per new head ({config.num_heads}), "
            f"got {len(head_sources)}"
        )
    head_index = [None if name is None else source.config.head_index(name) for name in head_sources]
    element_index = [
        source.config.elements.index(z) if z in source.config.elements else None
        for z in config.elements
    ]
    target = build_model(config, seed=seed, dtype=source.dtype).to(device=source.e0s.device)
    with torch.no_grad():
        for name, module in target.named_modules():
            origin = source.get_submodule(name)
            last = name.rsplit(".", 1)[-1]
            if isinstance(module, o3.Linear) and last in _ELEMENT_LINEARS:
                _copy_element_linear(module, origin, element_index)
            elif isinstance(module, o3.TensorProduct) and _reads_elements(module, config):
                _copy_element_tensor_product(module, origin, element_index)
            elif isinstance(module, ProductBasis):
                for contraction_t, contraction_s in zip(module.contractions, origin.contractions):
                    _copy_contraction(contraction_t, contraction_s, element_index, module.agnostic)
            elif isinstance(module, LinearReadout):
                _copy_linear_readout(module, origin, head_index)
            elif isinstance(module, NonLinearReadout):
                _copy_nonlinear_readout(module, origin, head_index)
            elif not _inside_handled(name, target):
                for pname, parameter in module.named_parameters(recurse=False):
                    parameter.copy_(_same_shape(origin, pname, f"{name}.{pname}", parameter))
        for name, buffer in target.named_buffers():
            module_name, _, bname = name.rpartition(".")
            if name in _CONFIG_BUFFERS or _inside_readout(module_name, target):
                continue  # defined by the new config / the readout's head count
            origin = source.get_submodule(module_name) if module_name else source
            buffer.copy_(_same_shape(origin, bname, name, buffer))
    return target


def _check_compatible(old: ModelConfig, new: ModelConfig) -> None:
    # a smooth model may be transplanted from a discontinuous one (same weights)
    skip = {"elements", "heads", "reproduce_cutoff_jump"}
    for key, value in old.to_dict().items():
        if key not in skip and new.to_dict()[key] != value:
            raise ValueError(
                f"transplant: architecture differs in {key!r}: {value!r} -> {new.to_dict()[key]!r}"
            )


def _same_shape(
    origin: torch.nn.Module, attribute: str, full_name: str, like: torch.Tensor
) -> torch.Tensor:
    value = getattr(origin, attribute)
    if value.shape != like.shape:
        raise ValueError(
            f"transplant: {full_name} has shape {tuple(value.shape)} in the source, "
            f"{tuple(like.shape)} here"
        )
    return value


def _inside_handled(name: str, model: torch.nn.Module) -> bool:
    """True for submodules whose weights a handler above copies (readouts, contractions)."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:depth]))
        if isinstance(parent, (LinearReadout, NonLinearReadout, SymmetricContraction)):
            return True
    return isinstance(model.get_submodule(name), SymmetricContraction)


def _inside_readout(name: str, model: torch.nn.Module) -> bool:
    parts = name.split(".") if name else []
    return any(
        isinstance(model.get_submodule(".".join(parts[:depth])), (LinearReadout, NonLinearReadout))
        for depth in range(1, len(parts) + 1)
    )


def _reads_elements(module: o3.TensorProduct, config: ModelConfig) -> bool:
    return module.irreps_in2 == o3.Irreps(f"{config.num_elements}x0e") and module.weight.numel() > 0


def _views(module: o3.Linear | o3.TensorProduct) -> list[tuple[float, torch.Tensor]]:
    """``(path weight, writable weight view)`` for every instruction of an e3nn module."""
    return [(ins.path_weight, view) for _, ins, view in module.weight_views(yield_instruction=True)]


def _copy_element_linear(
    target: o3.Linear, source: o3.Linear, element_index: list[int | None]
) -> None:
    for (weight_t, view_t), (weight_s, view_s) in zip(_views(target), _views(source)):
        ratio = weight_s / weight_t
        for row, index in enumerate(element_index):
            if index is not None:
                view_t[row].copy_(view_s[index] * ratio)


def _copy_element_tensor_product(
    target: o3.TensorProduct, source: o3.TensorProduct, element_index: list[int | None]
) -> None:
    if len(target.instructions) != len(source.instructions):
        raise ValueError("transplant: element tensor products have different paths")
    for (weight_t, view_t), (weight_s, view_s) in zip(_views(target), _views(source)):
        ratio = weight_s / weight_t
        for column, index in enumerate(element_index):
            if index is not None:
                view_t[:, column].copy_(view_s[:, index] * ratio)


def _copy_contraction(
    target: SymmetricContraction,
    source: SymmetricContraction,
    element_index: list[int | None],
    agnostic: bool,
) -> None:
    # The source's coupling basis comes along (e.g. mace-torch's, for imported foundations).
    for degree in range(1, source.correlation + 1):
        target.set_coupling(degree, source.coupling(degree))
    for weight_t, weight_s in zip(target.weights, source.weights):
        if agnostic:
            weight_t.copy_(weight_s)  # one table shared by all elements
            continue
        if weight_t.shape[1:] != weight_s.shape[1:]:
            raise ValueError("transplant: product-basis tables differ in shape")
        for row, index in enumerate(element_index):
            if index is not None:
                weight_t[row].copy_(weight_s[index])


def _copy_linear_readout(
    target: LinearReadout, source: LinearReadout, head_index: list[int | None]
) -> None:
    ((weight_t, view_t),) = _views(target.linear)
    ((weight_s, view_s),) = _views(source.linear)
    ratio = weight_s / weight_t
    for column, index in enumerate(head_index):
        if index is not None:
            view_t[:, column].copy_(view_s[:, index] * ratio)


def _copy_nonlinear_readout(
    target: NonLinearReadout, source: NonLinearReadout, head_index: list[int | None]
) -> None:
    ((weight1_t, first_t),) = _views(target.linear_1)
    ((weight1_s, first_s),) = _views(source.linear_1)
    ((weight2_t, second_t),) = _views(target.linear_2)
    ((weight2_s, second_s),) = _views(source.linear_2)
    width = first_t.shape[1] // target.num_heads
    if first_s.shape[1] // source.num_heads != width:
        raise ValueError("transplant: readout hidden width per head differs")
    ratio1 = weight1_s / weight1_t
    ratio2 = weight2_s / weight2_t
    # Blocks of other heads never reach a head's output (they are masked); zero them so
    # the transplanted weights are exactly the copied ones.
    fresh = second_t.clone()
    second_t.zero_()
    for h, index in enumerate(head_index):
        block_t = slice(h * width, (h + 1) * width)
        if index is None:
            second_t[block_t, h].copy_(fresh[block_t, h])
            continue
        block_s = slice(index * width, (index + 1) * width)
        first_t[:, block_t].copy_(first_s[:, block_s] * ratio1)
        second_t[block_t, h].copy_(second_s[block_s, index] * ratio2)
