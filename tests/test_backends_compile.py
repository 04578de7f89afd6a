"""torch.compile backend: eager's numbers over many batch sizes, and no recompilation.

Compilation on the 2-core CI machine costs about a minute per graph, so CI compiles the
two graphs (energies; energies + forces + stress) of a one-layer model once, into a
cache shared by this module, and then serves that model through a real server, which
must load it from the on-disk cache. The full matrix (both product kinds, float32, a
larger model) is marked slow.

Recompilations are counted twice: by the graphs the backend was handed
(``CompiledModel.compilations``) and by dynamo's own counter of unique graphs; and dynamo
is told to raise on any recompilation after warm-up.

Tolerances: Inductor fuses and reorders floating-point operations, so float64 results
differ from eager at round-off (~1e-14 relative), well inside the 1e-10 asked for. In
float32 the same reordering gives ~1e-6 relative on forces, which are sums of many
O(1) terms that cancel; 1e-4 of the largest force leaves a margin of 100 and still
catches any real error (a wrong edge or head moves forces by O(1)).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch._dynamo
from backends_support import (
    ELEMENTS,
    HEADS,
    assert_matches,
    mixed_batches,
    structure_pool,
    tiny_model,
)
from server_support import assert_close, request_for, running_server, scrape, stub
from torch._dynamo.utils import counters

from crossfield.model import HeadConfig, ModelConfig, build_model, evaluate
from crossfield.model.backends import compile_model
from crossfield.server.models import Backend
from crossfield.v1.messages import response_results

SIZES = [1, 2, 3, 5, 8, 13, 4, 1, 11, 7]


def one_layer_model() -> torch.nn.Module:
    config = ModelConfig(
        elements=ELEMENTS,
        heads=[
            HeadConfig(name=h, e0s=[-1.0 - i, -2.0, -3.0, -4.0, -5.0]) for i, h in enumerate(HEADS)
        ],
        hidden_irreps="4x0e+4x1o",
        max_ell=1,
        num_layers=1,
        correlation=[1],
        r_max=4.0,
        radial_mlp=[8],
        interaction_first="nonlinear",
        interaction="nonlinear",
        product="agnostic",
    )
    return build_model(config, seed=0).double().eval()


def check_no_recompiles(compiled, model, batches, relative, stress_every: int = 0) -> None:
    """Every batch matches eager, and not one of them compiles anything."""
    graphs = compiled.compilations
    unique = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for index, batch in enumerate(batches):
            stress = bool(stress_every) and index % stress_every == 0
            got = compiled(batch, compute_forces=True, compute_stress=stress)
            want = model(batch, compute_forces=True, compute_stress=stress)
            assert_matches(got, want, relative)
    assert compiled.compilations == graphs
    assert counters["stats"]["unique_graphs"] == unique


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compile-cache")


def cache_hits() -> int:
    return (
        counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    )


def test_compiled_model_matches_eager_without_recompiling(cache_dir):
    model = one_layer_model()
    compiled = compile_model(model, "compile", torch.float64, "cpu", cache_dir=cache_dir)
    warm = compiled.warm_up()
    assert warm.compilations == 2  # energies alone; energies, forces and stress
    assert warm.max_force_error < 1e-10
    assert any((cache_dir / "inductor").iterdir())
    check_no_recompiles(compiled, model, mixed_batches(model, SIZES), 1e-10, stress_every=2)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for batch in mixed_batches(model, [2, 7], seed=2):
            got = compiled(batch, compute_forces=False)
            assert_matches(got, model(batch, compute_forces=False), 1e-10)
    assert compiled.compilations == 2
    # A guard that fails after warm-up (here dynamo's global-state guard on the thread
    # count) runs that call eager: a request never waits for a compiler.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        batch = mixed_batches(model, [3], seed=3)[0]
        got = compiled(batch, compute_forces=True, compute_stress=True)
    finally:
        torch.set_num_threads(threads)
    assert_matches(got, model(batch, compute_forces=True, compute_stress=True), 1e-10)
    assert compiled.compilations == 2 and compiled.eager_fallbacks == 1
    # A retired version's compiled graphs must not keep its weights alive (hot-loading).
    weights = weakref.ref(compiled.model)
    del compiled
    gc.collect()
    assert weights() is None, "the compiled graphs keep a released model alive"


def test_server_loads_the_compiled_model_from_the_disk_cache(cache_dir):
    """The same model behind a real server: compiled at load time from the cache the first
    test filled, gRPC answers equal eager, and no request compiles anything."""
    model = one_layer_model()
    work = structure_pool(seed=7) + structure_pool(seed=8)
    want = evaluate(model, work)
    hits = cache_hits()
    with running_server({"one": model}, backend=Backend("compile", cache_dir)) as server:
        served = server.registry.resolve("one")
        graphs = served.model.compilations
        requests = [
            request_for(
                s,
                ("energy", "forces", "stress") if any(s.pbc) else ("energy",),
                model="one",
                id=str(i),
            )
            for i, s in enumerate(work)
        ]
        answers = {r.id: r for r in stub(server).ComputeStream(iter(requests), timeout=300)}
        metrics = scrape(server)
    assert cache_hits() > hits, "the restart compiled from scratch instead of the disk cache"
    assert served.backend == "compile" and graphs == 2
    # Not one request compiled: a guard failing after warm-up would have run eager
    # (``eager_fallbacks``) rather than put the compiler on the request's path.
    assert served.model.compilations == graphs, "a request compiled a graph"
    for index, reference in enumerate(want):
        got = response_results(answers[str(index)])
        for name, value in got.items():
            assert_close(value, reference[name], f"{name} of structure {index}")
    labels = frozenset({("model", "one"), ("version", "1"), ("backend", "compile")})
    assert metrics[("crossfield_model_compile_seconds", labels)] > 0


@pytest.mark.slow
@pytest.mark.parametrize("product", ["agnostic", "element"])
def test_compile_float64_all_properties(product, tmp_path):
    model = tiny_model(product)
    compiled = compile_model(model, "compile", torch.float64, "cpu", cache_dir=tmp_path)
    compiled.warm_up()
    energy_only = mixed_batches(model, [3, 9])
    graphs = compiled.compilations
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for batch in energy_only:
            got = compiled(batch, compute_forces=False)
            assert_matches(got, model(batch, compute_forces=False), 1e-10)
    check_no_recompiles(compiled, model, mixed_batches(model, SIZES, seed=1), 1e-10, 2)
    assert compiled.compilations == graphs


@pytest.mark.slow
def test_compile_float32(tmp_path):
    model = tiny_model(dtype=torch.float32)
    compiled = compile_model(model, "compile", torch.float32, "cpu", cache_dir=tmp_path)
    compiled.warm_up(property_sets=[(True, True)])
    batches = mixed_batches(model, SIZES[:6])
    graphs = compiled.compilations
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches:
            got = compiled(batch, compute_forces=True, compute_stress=True)
            want = model(batch, compute_forces=True, compute_stress=True)
            assert_matches(got, want, 1e-4, names=["forces", "stress"])
            assert_matches(got, want, 1e-6, names=["energy"])
    assert compiled.compilations == graphs
