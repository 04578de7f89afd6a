"""The cuEquivariance backend: MACE's two heavy products through cuequivariance-torch.

NVIDIA's cuequivariance-torch runs *segmented polynomials* with fused CUDA kernels
(``uniform_1d``), 2-5x faster than e3nn for MACE (mace-torch's ``enable_cueq``). Two parts
of our model are such polynomials and move there:

* the symmetric contraction of every product basis (``product.SymmetricContraction``):
  for each degree, ``W[z, k, c] U[M, a_1..a_nu, k] A[c, a_1]..A[c, a_nu]``;
* the channel-wise ("uvu") tensor product of every interaction's convolution, with the
  gather from senders and the sum onto receivers inside the kernel.

The polynomials are built from *our own* coefficients, not from cuequivariance's
descriptors: the coupling tensors ``U`` that the model carries (ours, or mace-torch's for an
imported model), and the e3nn tensor product's coefficients read off the module itself
(``convolution_coefficients``: one probe per path, so e3nn's path normalisation comes
along exactly). Nothing is renormalised or re-bases weights, so there is no conversion of
weights between bases to get wrong: mace-torch's history of wrong energies per head with
cuEquivariance (ACEsuit/mace #1298, #1469) came from such conversions. The backend is still
checked against eager on every head before it serves (``CompiledModel.warm_up``).

cuequivariance keeps features ``ir_mul`` (component-major, channel-minor) and e3nn
``mul_ir``; the modules transpose at their boundaries.

Where it runs: on a CUDA device with cuequivariance-ops-torch (its kernels); on the CPU
with cuequivariance's own PyTorch code (``naive``), which is exact and is how the tests
check the conversion, but no faster than eager. A CUDA device without the kernels is
refused (``BackendUnavailableError``): cuequivariance would otherwise fall back to its
naive code silently.
"""

from __future__ import annotations

import copy

import torch
from e3nn import o3

from .mace import CrossfieldMACE
from .product import ProductBasis


class CueqUnavailableError(RuntimeError):
    """cuequivariance cannot run here; ``backends.BackendUnavailableError`` wraps it."""


def kernel_method(device: torch.device) -> str:
    """cuequivariance's method on ``device``: its CUDA kernels, or its PyTorch code on the
    CPU. Raises ``CueqUnavailableError`` saying what is missing."""
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError as err:
        raise CueqUnavailableError(
            "backend 'cueq' needs cuequivariance-torch: pip install 'crossfield[cueq]'"
        ) from err
    if device.type == "cpu":
        return "naive"
    if device.type != "cuda":
        raise CueqUnavailableError(f"backend 'cueq' runs on CUDA or the CPU, not {device}")
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError as err:
        raise CueqUnavailableError(
            "backend 'cueq' on CUDA needs cuequivariance's kernels: pip install "
            "cuequivariance-ops-torch-cu12 (or -cu13, as torch's CUDA); without them it "
            "would run its slow reference code"
        ) from err
    return "uniform_1d"


def _ir_mul(x: torch.Tensor, irreps: o3.Irreps) -> torch.Tensor:
    """e3nn's ``mul_ir`` layout [N, dim] -> cuequivariance's ``ir_mul``."""
    parts = [
        x[:, s].reshape(-1, mul, ir.dim).transpose(1, 2).reshape(-1, mul * ir.dim)
        for (mul, ir), s in zip(irreps, irreps.slices())
    ]
    return torch.cat(parts, dim=1)


def _mul_ir(x: torch.Tensor, irreps: o3.Irreps) -> torch.Tensor:
    """cuequivariance's ``ir_mul`` layout [N, dim] -> e3nn's ``mul_ir``."""
    parts = [
        x[:, s].reshape(-1, ir.dim, mul).transpose(1, 2).reshape(-1, mul * ir.dim)
        for (mul, ir), s in zip(irreps, irreps.slices())
    ]
    return torch.cat(parts, dim=1)


def contraction_polynomial(product: ProductBasis):
    """The product basis' symmetric contractions as one cuequivariance polynomial:
    operands (weights [sets, W], features ``ir_mul`` [N, D C]) -> output ``ir_mul``
    [N, sum (2L+1) C], one stacked term per degree, our coupling tensors as coefficients."""
    import cuequivariance as cue

    first = product.contractions[0]
    channels, dim = first.weights[0].shape[-1], first.dim_in
    terms = []
    for degree in range(1, first.correlation + 1):
        modes = "abcdefgh"[:degree]
        d = cue.SegmentedTensorProduct.from_subscripts(f"w_{'_'.join(modes)}_i+{modes}iw")
        for operand in range(1, degree + 1):
            d.add_segment(operand, (dim,))
        for contraction in product.contractions:
            u = contraction.coupling(degree)  # [2L+1, D x degree, K]
            if u.shape[-1] == 0:  # no path to this irrep at this degree
                d.add_segment(degree + 1, (u.shape[0],))
                continue
            order = (*range(1, degree + 1), 0, degree + 1)  # -> [D x degree, 2L+1, K]
            d.add_path(None, *(0,) * degree, None, c=u.permute(order).cpu().numpy())
        d = d.flatten_coefficient_modes().append_modes_to_all_operands("u", {"u": channels})
        operation = cue.Operation([0, *([1] * degree), 2])
        terms.append(cue.SegmentedPolynomial(d.operands[:2], d.operands[-1:], [(operation, d)]))
    return cue.SegmentedPolynomial.stack(terms, [True, False, False])


def contraction_weights(product: ProductBasis) -> torch.Tensor:
    """Our weights [sets, K, C] of every (degree, irrep), flattened in the polynomial's
    operand order (degree-major, irreps in order, paths then channels)."""
    first = product.contractions[0]
    blocks = [
        contraction.weights[degree - 1].flatten(1)
        for degree in range(1, first.correlation + 1)
        for contraction in product.contractions
        if contraction.weights[degree - 1].shape[1]
    ]
    return torch.cat(blocks, dim=1)


class CueqProductBasis(torch.nn.Module):
    """``ProductBasis`` with its symmetric contractions in one cuequivariance call."""

    def __init__(self, product: ProductBasis, method: str) -> None:
        super().__init__()
        import cuequivariance_torch as cuet

        self.agnostic = product.agnostic
        self.linear = product.linear
        weights = contraction_weights(product).detach()
        self.register_buffer("weights", weights)
        self.out_blocks = [(c.weights[0].shape[-1], c.dim_out) for c in product.contractions]
        self.polynomial = cuet.SegmentedPolynomial(
            contraction_polynomial(product), method=method, math_dtype=weights.dtype
        )

    def forward(
        self, features: torch.Tensor, node_elements: torch.Tensor, skip: torch.Tensor | None
    ) -> torch.Tensor:
        n = features.shape[0]
        x = features.transpose(1, 2).reshape(n, -1)  # [N, C, D] -> ir_mul [N, D C]
        indices = None if self.agnostic else {0: node_elements}
        [out] = self.polynomial([self.weights, x], input_indices=indices)
        parts, start = [], 0
        for channels, dim in self.out_blocks:
            block = out[:, start : start + dim * channels]
            parts.append(block.reshape(n, dim, channels).transpose(1, 2).reshape(n, -1))
            start += dim * channels
        out = self.linear(torch.cat(parts, dim=1))
        return out if skip is None else out + skip


def convolution_coefficients(tp: o3.TensorProduct, index: int) -> torch.Tensor:
    """The coefficients [d1, d2, d3] of path ``index`` of an e3nn "uvu" tensor product,
    read off the module: channel 0 of input 1 and each component pair, weight 1 on that
    path alone. Every output is one product of a coefficient with ones, so this is exact,
    e3nn's path normalisation included."""
    instruction = tp.instructions[index]
    in1, in2, out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
    d1, d2 = in1[instruction.i_in1].ir.dim, in2[instruction.i_in2].ir.dim
    d3 = out[instruction.i_out].ir.dim
    first = torch.zeros(d1 * d2, in1.dim, dtype=torch.float64)
    second = torch.zeros(d1 * d2, in2.dim, dtype=torch.float64)
    weights = torch.zeros(d1 * d2, tp.weight_numel, dtype=torch.float64)
    pairs = torch.arange(d1 * d2)
    first[pairs, in1.slices()[instruction.i_in1].start + pairs // d2] = 1.0
    second[pairs, in2.slices()[instruction.i_in2].start + pairs % d2] = 1.0
    offset = sum(tp.instructions[k].path_shape[0] for k in range(index))
    weights[:, offset] = 1.0
    probe = copy.deepcopy(tp).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        values = probe(first, second, weights)
    start = out.slices()[instruction.i_out].start
    return values[:, start : start + d3].reshape(d1, d2, d3)


def convolution_polynomial(tp: o3.TensorProduct):
    """The convolution's tensor product as a cuequivariance polynomial: operands (per-edge
    weights [E, W], node features ``ir_mul``, edge spherical harmonics) -> messages
    ``ir_mul``, with e3nn's own coefficients (``convolution_coefficients``)."""
    import cuequivariance as cue

    in1, in2, out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
    d = cue.SegmentedTensorProduct.from_subscripts("u,iu,j,ku+ijk")
    for mul, ir in in1:
        d.add_segment(1, (ir.dim, mul))
    for _, ir in in2:
        d.add_segment(2, (ir.dim,))
    for mul, ir in out:
        d.add_segment(3, (ir.dim, mul))
    for index, instruction in enumerate(tp.instructions):
        mul = in1[instruction.i_in1].mul
        if instruction.connection_mode != "uvu" or not instruction.has_weight:
            raise ValueError(
                f"backend 'cueq': convolution path {index} is {instruction.connection_mode!r} "
                f"(weighted: {instruction.has_weight}); only weighted 'uvu' paths convert"
            )
        if in2[instruction.i_in2].mul != 1 or out[instruction.i_out].mul != mul:
            raise ValueError(
                f"backend 'cueq': convolution path {index} changes multiplicity "
                f"({in1[instruction.i_in1]} x {in2[instruction.i_in2]} -> "
                f"{out[instruction.i_out]}); only channel-wise paths convert"
            )
        coefficients = convolution_coefficients(tp, index).numpy()
        d.add_path(
            None, instruction.i_in1, instruction.i_in2, instruction.i_out,
            c=coefficients, dims={"u": mul},
        )  # fmt: skip
    d = d.flatten_coefficient_modes()
    operation = cue.Operation([0, 1, 2, 3])
    return cue.SegmentedPolynomial(d.operands[:3], d.operands[3:], [(operation, d)])


class CueqConvolution(torch.nn.Module):
    """An interaction's convolution in one cuequivariance call: gather from the senders,
    channel-wise tensor product, sum onto the receivers."""

    def __init__(self, tp: o3.TensorProduct, method: str, dtype: torch.dtype) -> None:
        super().__init__()
        import cuequivariance_torch as cuet

        self.irreps_in = tp.irreps_in1
        self.irreps_out = tp.irreps_out
        self.polynomial = cuet.SegmentedPolynomial(
            convolution_polynomial(tp), method=method, math_dtype=dtype
        )

    def forward(
        self,
        node_feats_up: torch.Tensor,
        edge_attrs: torch.Tensor,
        tp_weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        nodes = _ir_mul(node_feats_up, self.irreps_in)
        [messages] = self.polynomial(
            [tp_weights, nodes, edge_attrs],
            input_indices={1: edge_index[0]},
            output_indices={0: edge_index[1]},
            output_shapes={0: nodes},
        )
        return _mul_ir(messages, self.irreps_out)


def cueq_model(model: CrossfieldMACE, method: str) -> CrossfieldMACE:
    """A copy of ``model`` whose product bases and convolutions run through
    cuequivariance with ``method`` (``kernel_method``); the original is left as it was.
    ``ValueError`` names a part that does not convert."""
    converted = copy.deepcopy(model)
    for t, product in enumerate(converted.products):
        converted.products[t] = CueqProductBasis(product, method)
    for interaction in converted.interactions:
        interaction.fused_convolution = CueqConvolution(interaction.conv_tp, method, model.dtype)
    return converted.to(model.e0s.device)
