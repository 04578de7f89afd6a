"""The cuEquivariance backend (``model/backends_cueq.py``) on the CPU, for real: there
cuequivariance-torch runs its own PyTorch code for the same polynomials its CUDA kernels
run, so the conversion (coefficients, weight order, layouts, indexed weights, gather and
scatter) is checked exactly here; tests/test_gpu_backends.py runs the kernels.

mace-torch's known failure with cuEquivariance is wrong energies for some heads; so every
head is checked, the warm-up examples cover every head, and a wrong conversion is refused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from backends_support import ELEMENTS, HEADS, assert_matches, mixed_batches, tiny_model

pytest.importorskip("cuequivariance_torch", reason="the [cueq] extra is not installed")

from crossfield.model.backends import (  # noqa: E402
    BackendUnavailableError,
    compile_model,
    default_example_batches,
)
from crossfield.model.backends_cueq import (  # noqa: E402
    CueqConvolution,
    CueqProductBasis,
    CueqUnavailableError,
    kernel_method,
)


def converted(model: torch.nn.Module, dtype: torch.dtype = torch.float64):
    compiled = compile_model(model, "cueq", dtype, "cpu")
    parts = [type(p) for p in compiled.model.products]
    parts += [type(i.fused_convolution) for i in compiled.model.interactions]
    assert set(parts) == {CueqProductBasis, CueqConvolution}  # nothing left to e3nn
    return compiled


@pytest.mark.parametrize("product", ["agnostic", "element"])
def test_cueq_equals_eager_in_float64_on_every_head(product):
    model = tiny_model(product)
    compiled = converted(model)
    report = compiled.warm_up(property_sets=[(True, True)])
    assert report.max_force_error < 1e-12
    for batch in mixed_batches(model, [1, 9]):
        assert set(batch.heads.tolist()) <= set(range(len(HEADS)))
        got = compiled(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, 1e-12)


def test_cueq_float32_within_round_off():
    model = tiny_model(dtype=torch.float32)
    compiled = converted(model, torch.float32)
    for batch in mixed_batches(model, [7]):
        got = compiled(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, 1e-5)


def test_imported_mace_model_converts():
    """mace-torch's own coupling tensors (23 paths, not our 8) and its e3nn convolution."""
    mace_reference = pytest.importorskip("mace_reference", reason="mace-torch is not installed")
    from crossfield.model.mace_import import convert_mace

    mace = mace_reference.make_mace_model(
        ELEMENTS, HEADS, hidden="8x0e+8x1o", max_ell=2, correlation=2
    )
    model = convert_mace(mace)
    compiled = converted(model)
    for batch in mixed_batches(model, [6]):
        got = compiled(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, 1e-12)


def test_warm_up_covers_every_head_and_refuses_a_wrong_conversion():
    model = tiny_model()
    heads = torch.cat([batch.heads for batch in default_example_batches(model)])
    assert set(heads.tolist()) == set(range(len(HEADS)))
    compiled = converted(model)
    with torch.no_grad():
        compiled.model.products[1].weights[:, :8] *= 1.01  # one path's weights, slightly off
    with pytest.raises(RuntimeError, match="backend 'cueq': energy of example batch 0 differs"):
        compiled.warm_up()


def test_cuda_without_cuequivariance_kernels_is_refused_naming_them():
    try:
        import cuequivariance_ops_torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cuequivariance's kernels are installed here")
    with pytest.raises(CueqUnavailableError, match="cuequivariance-ops-torch-cu12"):
        kernel_method(torch.device("cuda"))
    assert kernel_method(torch.device("cpu")) == "naive"


def test_missing_cuequivariance_is_refused_naming_the_extra():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["cuequivariance_torch"] = None  # import fails as if not installed
        sys.path.insert(0, "tests")
        from backends_support import tiny_model
        from crossfield.model.backends import BackendUnavailableError, compile_model
        try:
            compile_model(tiny_model(), "cueq", None, "cpu")
        except BackendUnavailableError as err:
            print(err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "backend 'cueq' needs cuequivariance-torch: pip install 'crossfield[cueq]'" in (
        done.stdout
    ), done.stderr
    assert issubclass(BackendUnavailableError, RuntimeError)
