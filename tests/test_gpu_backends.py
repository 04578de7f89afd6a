"""GPU checks of the backends and of graphs on the device (``pytest -m gpu``, run by
bench/gpu_suite.sh on a machine with one CUDA GPU; skipped elsewhere, see conftest.py).

Each compares with the same model evaluated eagerly, in float64 where the kernels have it,
on batches that mix every head, molecules, small and large cells and a slab.
"""

from __future__ import annotations

import pytest
import torch
from backends_support import ELEMENTS, HEADS, assert_matches, mixed_batches, tiny_model
from device_graph_support import assert_same_batch, device_pool

from crossfield.model import build_batch
from crossfield.model.backends import compile_model
from crossfield.model.device_graph import build_batch_on_device

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
R_MAX = 4.0


def on_gpu(batches):
    return [batch.to(CUDA) for batch in batches]


def test_vesin_cuda_builds_the_same_edges_as_the_host():
    pool = device_pool()
    host = build_batch(pool, ELEMENTS, R_MAX, HEADS)
    device = build_batch_on_device(pool, ELEMENTS, R_MAX, HEADS, torch.float64, CUDA)
    assert device.edge_index.device.type == "cuda"
    assert_same_batch(device, host)


def test_vesin_cuda_packs_hundreds_of_molecules_in_one_call():
    pool = [s for s in device_pool() if not any(s.pbc)] * 40
    host = build_batch(pool, ELEMENTS, R_MAX, HEADS)
    device = build_batch_on_device(pool, ELEMENTS, R_MAX, HEADS, torch.float64, CUDA)
    assert_same_batch(device, host)


@pytest.mark.parametrize("product", ["agnostic", "element"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cueq_kernels_equal_eager_on_every_head(product, dtype):
    pytest.importorskip("cuequivariance_ops_torch", reason="cuequivariance's kernels missing")
    model = tiny_model(product, dtype=dtype).to(CUDA)
    compiled = compile_model(model, "cueq", dtype, CUDA)
    compiled.warm_up()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for batch in on_gpu(mixed_batches(model, [1, 7, 19])):
        got = compiled(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, tolerance)


def test_aot_package_on_cuda_equals_eager(tmp_path):
    model = tiny_model(dtype=torch.float32).to(CUDA)
    compiled = compile_model(model, "aot", torch.float32, CUDA, cache_dir=tmp_path)
    compiled.warm_up(property_sets=[(True, True)])
    reloaded = compile_model(model, "aot", torch.float32, CUDA, cache_dir=tmp_path)
    report = reloaded.warm_up(property_sets=[(True, True)])
    assert reloaded.loaded_from_cache and report.seconds < 30.0
    for batch in on_gpu(mixed_batches(model, [2, 9])):
        got = reloaded(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, 1e-4)


def test_cuda_graphs_replay_small_batches_without_recompiling(tmp_path):
    """Size buckets on CUDA are CUDA graphs: after warm-up, batches of one to three
    molecules (one bucket) replay without compiling and equal eager."""
    model = tiny_model(dtype=torch.float32).to(CUDA)
    compiled = compile_model(model, "compile", torch.float32, CUDA, tmp_path, shapes="buckets")
    assert compiled.cuda_graphs
    pool = [s for s in device_pool() if not any(s.pbc)][:3]
    config = model.config
    batches = [
        build_batch(pool[:k], config.elements, R_MAX, config.head_names, torch.float32, CUDA)
        for k in (1, 2, 3, 1, 2)
    ]
    compiled.warm_up(batches[:1], property_sets=[(True, False)])
    graphs = compiled.compilations
    for batch in batches:
        got = compiled(batch, compute_forces=True)
        want = model(batch, compute_forces=True)
        assert_matches(got, want, 1e-4, names=["energy", "forces"])
    assert compiled.compilations <= graphs + 2  # at most the two other atom buckets
