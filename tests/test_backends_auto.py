"""The ``auto`` backend, the default of ``crossfield serve`` and ``CrossfieldCalculator``:
the AOTInductor package when the cache holds this model's (for its dtype and device kind),
else eager, never a compiler at start. Building a package takes minutes, so the run with a
real package is in the slow end-to-end test of test_backends_aot.py; here, which package
``auto`` looks for, and that the calculator runs the backend it names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from backends_support import HEADS, tiny_model
from server_support import running_server

from crossfield.model.aot import artefact_name
from crossfield.model.backends import ready_backend
from crossfield.model.calculator import CrossfieldCalculator
from crossfield.server.models import Backend

CPU = torch.device("cpu")


def place_package(model, dtype: torch.dtype, cache) -> None:
    """A file where the package of ``model`` in ``dtype`` would be (never loaded here)."""
    converted = model.to(dtype=dtype)
    path = cache / "aot" / artefact_name(converted, CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_auto_looks_for_the_package_of_this_model_dtype_and_device(tmp_path):
    model = tiny_model()
    assert ready_backend(model, torch.float64, CPU, None) == "eager"
    assert ready_backend(model, torch.float64, CPU, tmp_path) == "eager"
    place_package(tiny_model(), torch.float32, tmp_path)
    assert ready_backend(model, torch.float64, CPU, tmp_path) == "eager"  # other dtype
    assert ready_backend(model, torch.float32, CPU, tmp_path) == "aot"
    retrained = tiny_model()
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    assert ready_backend(retrained, torch.float32, CPU, tmp_path) == "eager"  # other weights
    assert next(model.parameters()).dtype == torch.float64  # the caller's model untouched
    # A model no package can hold runs eager, whatever the cache holds.
    element = tiny_model("element")
    place_package(tiny_model("element"), torch.float64, tmp_path)
    assert ready_backend(element, torch.float64, CPU, tmp_path) == "eager"


def test_calculator_runs_the_backend_it_names(tmp_path):
    model = tiny_model()
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    eager = CrossfieldCalculator(model, HEADS[0], cache_dir=tmp_path)
    assert eager.backend == "eager" and eager.model is model  # no package: the module itself
    script = CrossfieldCalculator(model, HEADS[0], backend="script", cache_dir=tmp_path)
    assert script.backend == "script" and script.model.backend == "script"
    want = eager.get_forces(atoms)
    got = script.get_forces(atoms)
    np.testing.assert_allclose(got, want, atol=1e-10)  # float64: round-off only
    assert abs(script.get_potential_energy(atoms) - eager.get_potential_energy(atoms)) < 1e-10
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        CrossfieldCalculator(model, HEADS[0], backend="fast")


def test_a_server_on_auto_without_a_package_serves_eager(tmp_path):
    backend = Backend("auto", cache_dir=tmp_path)
    with running_server({"tiny": tiny_model()}, backend=backend) as server:
        assert server.registry.resolve("tiny", "").backend == "eager"
