"""Eager and TorchScript backends against the module, padding, and backend selection.

Tolerances: a traced graph runs the same kernels in the same order as eager, so float64
results agree to round-off (1e-10 relative is generous); float32 to 1e-5 relative, a few
ulps amplified through two layers (float32 eps is 1.2e-7).
"""

from __future__ import annotations

import pytest
import torch
from backends_support import assert_matches, mixed_batches, structure_pool, tiny_model

from crossfield.model import evaluate
from crossfield.model.backends import (
    available_backends,
    compile_model,
    pad_batch,
)

SIZES = [1, 2, 3, 5, 8, 13, 4, 1, 11]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def reference(model, batch, stress: bool) -> dict:
    return model(batch, compute_forces=True, compute_stress=stress)


@pytest.mark.parametrize("backend", ["eager", "script"])
def test_backend_matches_module_in_float64(model, backend, tmp_path):
    compiled = compile_model(model, backend, torch.float64, "cpu", cache_dir=tmp_path)
    warm = compiled.warm_up()
    assert warm.max_force_error < 1e-12
    for index, batch in enumerate(mixed_batches(model, SIZES)):
        stress = index % 2 == 0
        got = compiled(batch, compute_forces=True, compute_stress=stress)
        assert_matches(got, reference(model, batch, stress), 1e-10)
    assert compiled.compilations == (0 if backend == "eager" else 1)


def test_script_float32_within_float32_round_off(tmp_path):
    model32 = tiny_model(dtype=torch.float32)
    compiled = compile_model(model32, "script", torch.float32, "cpu", cache_dir=tmp_path)
    compiled.warm_up()
    for batch in mixed_batches(model32, [1, 6, 9]):
        got = compiled(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, reference(model32, batch, True), 1e-5)


def test_energy_only_calls_build_no_graph(model):
    compiled = compile_model(model, "script", torch.float64, "cpu")
    batch = mixed_batches(model, [4])[0]
    with torch.no_grad():
        out = compiled(batch, compute_forces=False)
    assert set(out) == {"energy", "node_energy"}
    assert not out["energy"].requires_grad
    assert_matches(out, model(batch, compute_forces=False), 1e-10)


def test_script_trace_is_cached_on_disk(model, tmp_path):
    first = compile_model(model, "script", torch.float64, "cpu", cache_dir=tmp_path)
    first.warm_up()
    assert not first.loaded_from_cache
    files = list(tmp_path.glob("script-*.pt"))
    assert len(files) == 1
    second = compile_model(model, "script", torch.float64, "cpu", cache_dir=tmp_path)
    second.warm_up()
    assert second.loaded_from_cache
    changed = tiny_model()
    with torch.no_grad():
        changed.e0s.add_(1.0)
    third = compile_model(changed, "script", torch.float64, "cpu", cache_dir=tmp_path)
    third.warm_up()
    assert not third.loaded_from_cache  # other weights, other file
    assert len(list(tmp_path.glob("script-*.pt"))) == 2


def test_script_refuses_per_element_products():
    with pytest.raises(ValueError, match="config.product = 'element'"):
        compile_model(tiny_model("element"), "script", torch.float64, "cpu")


@pytest.mark.parametrize("product", ["agnostic", "element"])
def test_padding_leaves_real_structures_unchanged(product):
    model = tiny_model(product)
    batch = mixed_batches(model, [5])[0]
    n, e, b = batch.num_atoms, batch.num_edges, batch.num_structures
    padded = pad_batch(batch, n + 7, e + 31, b + 3, model.config.r_max)
    want = model(batch, compute_forces=True, compute_stress=True)
    got = model(padded, compute_forces=True, compute_stress=True)
    for name in ("energy", "stress", "virials"):
        torch.testing.assert_close(got[name][:b], want[name], rtol=1e-12, atol=1e-12)
    for name in ("node_energy", "forces"):
        torch.testing.assert_close(got[name][:n], want[name], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got["forces"]).all()


def test_drop_in_for_the_module(model):
    """What the server reads from a model: config, dtype, buffers, and evaluate() works."""
    compiled = compile_model(model, "script", torch.float64, "cpu")
    assert compiled.config is not model.config and compiled.config == model.config
    assert compiled.dtype == torch.float64
    assert next(compiled.buffers()).device == torch.device("cpu")
    structures = structure_pool()[:4]
    for got, want in zip(evaluate(compiled, structures), evaluate(model, structures)):
        for name in want:
            assert abs(got[name] - want[name]).max() <= 1e-10 * max(abs(want[name]).max(), 1)


def test_unknown_names_are_refused(model):
    with pytest.raises(ValueError, match="backend: unknown backend 'jit'"):
        compile_model(model, "jit")
    with pytest.raises(ValueError, match="shapes: unknown mode"):
        compile_model(model, "compile", shapes="ragged")


def test_model_is_not_modified(model):
    compile_model(model, "eager", torch.float32, "cpu")
    assert model.dtype == torch.float64
    assert all(p.requires_grad for p in model.parameters())


def test_tensorrt_is_no_backend(model):
    """TensorRT never ran here (issue 17): it is out of the product, refused by name."""
    assert "tensorrt" not in available_backends("cpu")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        compile_model(model, "tensorrt", torch.float32, "cpu")
