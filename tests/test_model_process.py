"""``--model-process``: the models evaluated in a child process, through a real server.

Float64 throughout, so the answers must equal the same model's in-process evaluation to
round-off (1e-10 relative: the arrays cross the pipe as raw float64, nothing is
re-computed differently). The child is killed outright (SIGKILL, or ``os._exit`` inside
the model, as a crash in a kernel would end it) and every accepted request must still get
exactly one answer: the right one, or an error for the structure that kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from model_process_support import crashing
from server_support import (
    assert_close,
    request_for,
    runner_held,
    running_server,
    scrape,
    small_model,
    structures,
    stub,
    wait_queued,
)

from crossfield.model import build_batch, evaluate
from crossfield.model.graph import Structure
from crossfield.server.app import ServerConfig, model_process
from crossfield.server.metrics import Metrics
from crossfield.server.model_child import Child
from crossfield.server.model_process import ModelSpec, pickle_model
from crossfield.server.models import retire
from crossfield.v1.messages import response_results

MODEL_PROCESS = {"model_process": True}


def reference(model, batch: list[Structure]) -> list[dict]:
    return evaluate(model, batch, compute_stress=True)


def check_answer(response, expected: dict, what: str) -> None:
    results = response_results(response)
    assert_close(results["energy"], expected["energy"], f"{what} energy")
    assert_close(results["forces"], expected["forces"], f"{what} forces")


def model_spec(model) -> ModelSpec:
    """``model`` as the server gives it to the child: eager, in its own dtype."""
    dtype = str(model.dtype).removeprefix("torch.")
    return ModelSpec(pickle_model(model), "eager", dtype, cache_dir=None, shapes="dynamic")


def send_batch(server, batch: list[Structure]) -> list:
    """``batch`` queued while the device is held, so it runs as one batch; the futures."""
    inference = stub(server)
    with runner_held(server):
        futures = [inference.Compute.future(request_for(s), timeout=120) for s in batch]
        wait_queued(server, len(batch))
    return futures


def test_a_model_process_answers_what_the_model_gives_in_process() -> None:
    model = small_model()
    batch = structures(16, seed=3)
    expected = reference(model, batch)
    with running_server({"small": model}, settings=MODEL_PROCESS) as server:
        futures = send_batch(server, batch)
        for index, future in enumerate(futures):
            check_answer(future.result(), expected[index], f"structure {index}")
        assert server.runner.process.restarts == 0


def test_versions_live_side_by_side_in_the_model_process_and_leave_it_when_retired() -> None:
    first, second = small_model(seed=0), small_model(seed=1)
    structure = structures(1, seed=11)[0]
    expected = {"1": reference(first, [structure])[0], "2": reference(second, [structure])[0]}
    with running_server({"small": first}, settings=MODEL_PROCESS) as server:
        server.add_model(second, "small", "2")
        inference = stub(server)
        for version, wanted in expected.items():
            request = request_for(structure)
            request.version = version
            check_answer(inference.Compute(request, timeout=60), wanted, f"version {version}")
        retired = server.registry.remove("small", "1")
        retire(retired, server.metrics)
        kept = server.registry.resolve("small", "2").evaluator.key
        assert list(server.runner.process._models) == [kept]
        check_answer(inference.Compute(request_for(structure), timeout=60), expected["2"], "v2")


def test_a_killed_model_process_is_replaced_and_no_answer_is_lost() -> None:
    model = small_model()
    batch = structures(12, seed=5)
    expected = reference(model, batch)
    with running_server({"small": model}, settings=MODEL_PROCESS) as server:
        process = server.runner.process
        inference = stub(server)
        with runner_held(server):  # the batch is queued when the child dies
            futures = [inference.Compute.future(request_for(s), timeout=120) for s in batch]
            wait_queued(server, len(batch))
            os.kill(process._child.process.pid, signal.SIGKILL)
            process._child.process.wait()
        for index, future in enumerate(futures):
            check_answer(future.result(), expected[index], f"structure {index}")
        assert process.restarts == 1
        assert scrape(server)[("crossfield_model_process_restarts_total", frozenset())] == 1
        # and the new child goes on serving
        check_answer(inference.Compute(request_for(batch[0]), timeout=60), expected[0], "after")


def test_signals_meant_for_the_server_leave_its_model_process_alone() -> None:
    """A Ctrl-C goes to the terminal's process group, systemd's stop signal to every
    process of the service: the child is in a session of its own and ignores both, so
    the server drains its queue through the same child (no restart, no lost answer)."""
    model = small_model()
    batch = structures(6, seed=9)
    expected = reference(model, batch)
    with running_server({"small": model}, settings=MODEL_PROCESS) as server:
        inference = stub(server)
        check_answer(inference.Compute(request_for(batch[0]), timeout=60), expected[0], "first")
        child = server.runner.process._child.process
        assert os.getpgid(child.pid) != os.getpgid(os.getpid())
        with runner_held(server):
            futures = [inference.Compute.future(request_for(s), timeout=120) for s in batch]
            wait_queued(server, len(batch))
            os.kill(child.pid, signal.SIGINT)
            os.kill(child.pid, signal.SIGTERM)
        for index, future in enumerate(futures):
            check_answer(future.result(), expected[index], f"structure {index}")
        assert child.poll() is None and server.runner.process.restarts == 0


def test_a_structure_that_kills_the_model_process_fails_alone() -> None:
    model = crashing(small_model())
    batch = [s for s in structures(8, seed=7) if 14 not in s.numbers][:3]
    silicon = next(s for s in structures(8, seed=7) if 14 in s.numbers)
    expected = reference(small_model(), batch)
    with running_server({"small": model}, settings=MODEL_PROCESS) as server:
        futures = send_batch(server, [*batch, silicon])
        for index, future in enumerate(futures[:-1]):
            check_answer(future.result(), expected[index], f"molecule {index}")
        with pytest.raises(grpc.RpcError) as failed:
            futures[-1].result()
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "model process exited (code 70)" in failed.value.details()
        assert server.runner.process.restarts >= 2  # the batch, then the halves with Si


def test_serve_refuses_a_model_process_on_a_gpu() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "crossfield.cli", "serve", "--model-process", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 2, run.stderr
    assert "model_process: runs models on the CPU only" in run.stderr


def test_the_automatic_choice_gives_eager_models_a_model_process_and_keeps_aot_packages() -> None:
    """``model_process=None`` (``crossfield serve``'s default): on a CPU, models that run
    Python between kernels go to the child, AOT packages stay (their lone MD steps would
    pay the hop: the server keeps no copy of a package to run them itself); the child
    starts with the first model it is given, and a GPU gets none."""
    metrics = Metrics()
    process = model_process(ServerConfig(device="cpu", model_process=None), metrics)
    assert [process.evaluates(kind) for kind in ("eager", "compile", "script", "aot")] == [
        True,
        True,
        True,
        False,
    ]
    assert process._child is None  # an AOT-only server never starts one
    process.close()
    assert model_process(ServerConfig(device="cuda", model_process=None), metrics) is None
    model = small_model()
    batch = structures(6, seed=13)
    expected = reference(model, batch)
    with running_server({"small": model}, settings={"model_process": None}) as server:
        assert server.registry.resolve("small").evaluator is not None  # in the child
        for index, future in enumerate(send_batch(server, batch)):
            check_answer(future.result(), expected[index], f"structure {index}")
        assert server.runner.process._child.alive


def test_a_model_process_launched_ahead_is_adopted_and_one_no_model_needs_is_ended() -> None:
    """``crossfield serve`` launches its model process before its own imports
    (``model_child.Child``): the server evaluates in that child, not a second one; one
    that no model came to (AOT packages stay in the server's process) is ended, and a later
    model starts another, which is no restart; a GPU's server ends it at once."""
    metrics = Metrics()
    cpu = ServerConfig(device="cpu", model_process=None)
    model = small_model()
    batch = structures(4, seed=17)
    expected = reference(model, batch)
    config = model.config
    graph = build_batch(batch, config.elements, config.r_max, config.head_names, model.dtype)

    def answers(process, key: str) -> None:
        out = process.evaluate(key, graph, compute_forces=True, compute_stress=False)
        energies = [e["energy"] for e in expected]
        assert_close(out["energy"].numpy(), energies, "energies from the adopted child")

    child = Child(1)
    process = model_process(cpu, metrics, child)
    key, _ = process.load(model_spec(model))
    answers(process, key)
    assert process.pid == child.process.pid  # the child launched ahead, adopted
    process.release_idle()  # it holds a model: kept
    assert child.alive
    process.close()

    idle = Child(1)
    process = model_process(cpu, metrics, idle)
    process.release_idle()
    assert idle.process.poll() is not None and process.pid is None
    key, _ = process.load(model_spec(model))  # a later model starts a new child
    answers(process, key)
    assert process.pid not in (None, idle.process.pid) and process.restarts == 0
    process.close()

    unwanted = Child(1)
    assert model_process(ServerConfig(device="cuda", model_process=None), metrics, unwanted) is None
    assert unwanted.process.poll() is not None
