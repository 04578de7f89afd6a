"""The AOTInductor backend (``model/aot.py``): a version compiled once, then loaded in
seconds, with energies, forces and stress from one exported program that must equal eager.

The key and the refusals are checked in CI; building a package takes minutes on a 2-core
CPU, so the end-to-end test (``crossfield compile``, then ``crossfield serve --backend aot``
from the same cache: time to serving, answers equal to eager) is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from ase.build import bulk
from backends_support import HEADS, assert_matches, mixed_batches, structure_pool, tiny_model
from client_support import free_port
from server_support import assert_close, request_for

from crossfield.model import evaluate, save_checkpoint
from crossfield.model.aot import artefact_key, device_kind
from crossfield.model.backends import compile_model
from crossfield.model.calculator import CrossfieldCalculator
from crossfield.v1 import inference_pb2_grpc
from crossfield.v1.arrays import from_array

CPU = torch.device("cpu")


def test_aot_refuses_per_element_products_naming_the_field():
    with pytest.raises(ValueError, match="'aot' cannot export.*config.product = 'element'"):
        compile_model(tiny_model("element"), "aot", torch.float64, "cpu")


def test_artefact_key_follows_everything_the_package_depends_on():
    model = tiny_model()
    key = artefact_key(model, CPU)
    assert artefact_key(tiny_model(), CPU) == key  # same weights, same key
    assert artefact_key(model.to(torch.float32), CPU) != key
    changed = tiny_model()
    with torch.no_grad():
        changed.readouts[0].linear.weight.add_(1e-12)
    assert artefact_key(changed, CPU) != key
    assert device_kind(CPU).startswith("cpu-")


@pytest.mark.slow
def test_compiled_once_then_served_from_the_cache_in_seconds(tmp_path):
    model = tiny_model()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(model, checkpoint)
    cache = tmp_path / "cache"
    base = [sys.executable, "-m", "crossfield.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    compile_command = [*base, "compile", "--checkpoint", str(checkpoint), "--dtype", "float64"]
    compile_command += ["--compile-cache", str(cache)]
    done = subprocess.run(compile_command, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stderr
    assert "compiled in" in done.stdout and "every head matches eager" in done.stdout

    # In-process from the same cache: loaded, not compiled, and equal to eager.
    loaded = compile_model(model, "aot", torch.float64, "cpu", cache_dir=cache)
    report = loaded.warm_up()
    assert loaded.loaded_from_cache and loaded.compilations == 0
    for batch in mixed_batches(model, [1, 6, 13]):
        got = loaded(batch, compute_forces=True, compute_stress=True)
        want = model(batch, compute_forces=True, compute_stress=True)
        assert_matches(got, want, 1e-10)
        assert sorted(loaded(batch, compute_forces=False)) == ["energy", "node_energy"]

    # The calculator's default backend (auto) finds the package and runs it.
    calculator = CrossfieldCalculator(model, HEADS[0], torch.float64, cache_dir=cache)
    assert calculator.backend == "aot"
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    atoms.calc = calculator
    reference = CrossfieldCalculator(model, HEADS[0], torch.float64, backend="eager")
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(atoms), atol=1e-10)

    # A server restarted on that cache with the default backend (auto) finds the package:
    # it serves in seconds and answers as eager.
    port = free_port()
    serve = [*base, "serve", "--checkpoint", str(checkpoint), "--name", "tiny"]
    serve += ["--compile-cache", str(cache), "--dtype", "float64", "--port", str(port)]
    serve += ["--metrics-port", "-1"]
    start = time.monotonic()
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in server.stdout:
            log.append(line)
            if "listening on port" in line:
                break
        else:
            pytest.fail("crossfield serve exited before serving")
        to_serving = time.monotonic() - start
        pool = structure_pool(seed=4)
        inference = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        requests = [request_for(s, model="tiny", id=str(i)) for i, s in enumerate(pool)]
        answers = {a.id: a for a in inference.ComputeStream(iter(requests), timeout=120)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    for index, want in enumerate(evaluate(model, pool)):
        assert_close(answers[str(index)].energy, want["energy"], f"energy {index}")
        assert_close(from_array(answers[str(index)].forces), want["forces"], f"forces {index}")
    assert {s.head for s in pool} == set(HEADS)
    assert report.seconds < 30.0, f"{report.seconds:.1f} s to load and check the package"
    assert to_serving < 60.0, f"{to_serving:.1f} s to serving from a warm compile cache"
    assert any("backend auto runs aot" in line for line in log), "".join(log)
