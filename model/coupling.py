"""Generalised Clebsch-Gordan coupling tensors for the symmetric product basis.

``U^(nu)[M, a1..a_nu, k]`` maps nu copies of one channel's features A (a concatenation
of irreps, e.g. 0e+1o+2e+3o) onto the k-th equivariant polynomial of degree nu that
transforms as the target irrep L (component M).

Construction (ours): couple the inputs left to right through every allowed intermediate
irrep with Wigner 3j symbols, which spans all degree-nu equivariants; then project onto
the part that is symmetric under permuting a1..a_nu (the product of identical A's sees
nothing else) and keep an orthonormal basis of that span from an SVD. The result is the
minimal set of independent paths, so no weight is wasted on a redundant combination.
"""

from __future__ import annotations

import functools
import itertools

import torch
from e3nn import o3


def _couple(irreps: o3.Irreps, degree: int, target: o3.Irrep) -> list[torch.Tensor]:
    """All left-to-right couplings of ``degree`` copies of ``irreps`` onto ``target``.

    Each is a tensor [M, D, ..., D]. Intermediate irreps that cannot return to the target
    in the remaining steps are pruned as they appear.
    """
    dim = irreps.dim
    offsets = [0]
    for _, ir in irreps:
        offsets.append(offsets[-1] + ir.dim)
    paths: list[tuple[o3.Irrep, torch.Tensor]] = []
    for index, (_, ir) in enumerate(irreps):
        tensor = torch.zeros(ir.dim, dim, dtype=torch.float64)
        tensor[:, offsets[index] : offsets[index + 1]] = torch.eye(ir.dim, dtype=torch.float64)
        paths.append((ir, tensor))
    for step in range(1, degree):
        remaining = degree - 1 - step
        coupled = []
        for ir_left, left in paths:
            for index, (_, ir_right) in enumerate(irreps):
                for ir_out in ir_left * ir_right:
                    if abs(ir_out.l - target.l) > remaining * irreps.lmax:
                        continue
                    if remaining == 0 and ir_out != target:
                        continue
                    w3j = o3.wigner_3j(ir_left.l, ir_right.l, ir_out.l, dtype=torch.float64)
                    block = torch.einsum("l...,lrm->m...r", left, w3j)
                    tensor = torch.zeros(*block.shape[:-1], dim, dtype=torch.float64)
                    tensor[..., offsets[index] : offsets[index + 1]] = block
                    coupled.append((ir_out, tensor))
        paths = coupled
    return [tensor for ir, tensor in paths if ir == target]


@functools.lru_cache(maxsize=64)
def _coupling_tensor_cached(irreps: str, target: str, degree: int) -> torch.Tensor:
    irreps_in = o3.Irreps(irreps)
    ir_target = o3.Irrep(target)
    candidates = _couple(irreps_in, degree, ir_target)
    dim_m = ir_target.dim
    if not candidates:
        return torch.zeros(dim_m, *([irreps_in.dim] * degree), 0, dtype=torch.float64)
    stacked = torch.stack(candidates)  # [P, M, D, ..., D]
    permutations = list(itertools.permutations(range(2, 2 + degree)))
    symmetric = sum(stacked.permute(0, 1, *p) for p in permutations) / len(permutations)
    flat = symmetric.reshape(len(candidates), -1)
    _, singular, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = int((singular > 1e-9 * singular.max()).sum()) if singular.numel() else 0
    # Each basis tensor has norm sqrt(2L+1): every output component is O(1) for O(1) inputs.
    basis = vh[:rank] * dim_m**0.5
    return (
        basis.reshape(rank, dim_m, *([irreps_in.dim] * degree))
        .permute(*range(1, degree + 2), 0)
        .contiguous()
    )


def coupling_tensor(irreps: o3.Irreps, target: o3.Irrep, degree: int) -> torch.Tensor:
    """``U`` of shape ``[2L+1, D, ..., D (degree times), K]`` in float64."""
    return _coupling_tensor_cached(str(o3.Irreps(irreps)), str(target), degree).clone()
