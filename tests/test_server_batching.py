"""The dynamic batcher on a real server: budgets, maximum delay, mixed heads, the bounded
queue, deadlines and cancellation, and when a batch is handed over (at once to an idle
device, grown while it is busy).

Structures that should wait together wait while the device is held busy
(``runner_held``): an idle device takes every structure the moment it arrives."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from server_support import (
    HEADS,
    request_for,
    runner_held,
    running_server,
    scrape,
    small_model,
    stub,
    wait_queued,
)

from crossfield.model import Structure, evaluate, neighbour_list
from crossfield.server.validation import check_request, estimate_neighbours
from crossfield.server.work import WorkItem

SMALL = frozenset({("model", "small")})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return small_model()


def waters(count: int, head: str = "pbe") -> list[Structure]:
    rng = np.random.default_rng(count)
    result = []
    for _ in range(count):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(scale=0.05, size=(3, 3))
        result.append(Structure.from_atoms(atoms, head=head))
    return result


def test_heads_mix_in_one_batch(model) -> None:
    work = [Structure.from_atoms(molecule("CH4"), head=head) for head in HEADS]
    work.append(Structure.from_atoms(bulk("Si", "diamond", a=5.43), head="wb97"))
    requests = [request_for(s, id=str(i)) for i, s in enumerate(work)]
    with running_server({"small": model}, max_delay=0.5) as server:
        with runner_held(server):
            call = stub(server).ComputeStream(iter(requests), timeout=60)
            wait_queued(server, len(requests))
        responses = {r.id: r for r in call}
        metrics = scrape(server)
    assert metrics[("crossfield_batch_structures_count", SMALL)] == 1
    assert metrics[("crossfield_batch_structures_sum", SMALL)] == len(work)
    energies = [responses[str(i)].energy for i in range(len(work))]
    assert len(set(energies[:3])) == 3  # same molecule, three heads, three answers
    for energy, structure in zip(energies, work):
        np.testing.assert_allclose(energy, evaluate(model, [structure])[0]["energy"], rtol=1e-10)


def test_full_atom_budget_dispatches_without_waiting_for_the_delay(model) -> None:
    with running_server({"small": model}, max_delay=20.0, max_atoms=12) as server:
        start = time.monotonic()
        with runner_held(server):  # a busy device: only full budgets hand batches over
            call = stub(server).ComputeStream(iter(request_for(s) for s in waters(8)), timeout=60)
            responses = [next(call) for _ in range(4)]
        responses += list(call)
        elapsed = time.monotonic() - start
        metrics = scrape(server)
    assert len(responses) == 8 and all(r.status.code == 0 for r in responses)
    assert elapsed < 10.0, "batches waited for the delay although their atom budget was full"
    assert metrics[("crossfield_batch_structures_count", SMALL)] == 2  # 4 waters = 12 atoms each
    assert metrics[("crossfield_batch_atoms_bucket", SMALL | {("le", "8.0")})] == 0
    assert metrics[("crossfield_batch_atoms_bucket", SMALL | {("le", "32.0")})] == 2


def test_edge_budget_splits_batches(model) -> None:
    crystal = Structure.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True))
    edges = len(neighbour_list(crystal.positions, crystal.cell, crystal.pbc, 4.0)[0])
    requests = [request_for(crystal, id=str(i)) for i in range(4)]
    with running_server({"small": model}, max_delay=0.5, max_edges=int(2.5 * edges)) as server:
        with runner_held(server):  # the first two go as soon as a third fills the budget
            call = stub(server).ComputeStream(iter(requests), timeout=60)
            responses = [next(call), next(call)]
            wait_queued(server, 2)
        responses += list(call)
        metrics = scrape(server)
    assert len(responses) == 4
    assert metrics[("crossfield_batch_structures_count", SMALL)] == 2


def test_a_cpu_server_keeps_batches_within_its_cache_friendly_budget(model) -> None:
    """Left unset, the budgets are the device's: on a CPU 12288 edges (larger batches run
    slower per edge there), so 512-atom crystals of 8192 edges (6.9k estimated, which is
    what the batcher counts) run one at a time however many wait; the GPU budget, given
    explicitly, takes them together."""
    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat(4)  # 512 atoms
    structure = Structure.from_atoms(crystal)
    edges = len(neighbour_list(structure.positions, structure.cell, structure.pbc, 4.0)[0])
    assert 12288 / 2 < edges < 12288  # one fits the CPU's edge budget, two do not
    requests = [request_for(structure, id=str(i)) for i in range(4)]
    budgets = {"cpu": {}, "gpu": {"max_atoms": 4096, "max_edges": 131072}}
    batches = {}
    for device, limits in budgets.items():
        with running_server({"small": model}, max_delay=0.5, **limits) as server:
            served = server.registry.resolve("small")
            assert (served.batcher.limits.max_atoms, served.batcher.limits.max_edges) == (
                (4096, 12288) if device == "cpu" else (4096, 131072)
            )
            with runner_held(server):  # all four wait together for the device
                call = stub(server).ComputeStream(iter(requests), timeout=60)
                if device == "gpu":  # (on the CPU each fills a budget and goes on alone)
                    wait_queued(server, len(requests))
            assert all(r.status.code == 0 for r in call)
            batches[device] = scrape(server)[("crossfield_batch_structures_count", SMALL)]
    assert batches == {"cpu": 4, "gpu": 1}


def test_full_queue_answers_resource_exhausted(model) -> None:
    with running_server({"small": model}, max_delay=3.0, max_queue=2) as server:
        inference = stub(server)
        with runner_held(server):
            calls = [inference.Compute.future(request_for(s), timeout=60) for s in waters(2)]
            wait_queued(server, 2)
            with pytest.raises(grpc.RpcError) as raised:
                inference.Compute(request_for(waters(1)[0]), timeout=60)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full (2 structures waiting)" in raised.value.details()
        assert all(call.result().HasField("energy") for call in calls)
        metrics = scrape(server)
    exhausted = SMALL | {("version", "1"), ("head", "pbe"), ("status", "RESOURCE_EXHAUSTED")}
    assert metrics[("crossfield_requests_total", exhausted)] == 1


def test_expired_and_cancelled_requests_leave_the_queue_unevaluated(model) -> None:
    with running_server({"small": model}, max_delay=1.5) as server:
        inference = stub(server)
        with runner_held(server):
            with pytest.raises(grpc.RpcError) as raised:
                inference.Compute(request_for(waters(1)[0]), timeout=0.3)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = inference.ComputeStream(iter(request_for(s) for s in waters(5)), timeout=60)
            time.sleep(0.3)
            stream.cancel()
            call = inference.Compute.future(request_for(waters(1)[0]), timeout=60)
            time.sleep(0.3)
            call.cancel()
            time.sleep(2.0)  # past the batcher's delay
        time.sleep(0.5)  # the device idle again: anything still queued would now run
        metrics = scrape(server)
    assert metrics.get(("crossfield_batch_structures_count", SMALL), 0) == 0
    statuses = {
        dict(labels)["status"]: value
        for (name, labels), value in metrics.items()
        if name == "crossfield_requests_total"
    }
    assert sum(statuses.values()) == 7 and "OK" not in statuses
    assert set(statuses) <= {"CANCELLED", "DEADLINE_EXCEEDED"}


def batches(server) -> tuple[float, float]:
    """(batches run, structures in them) so far."""
    metrics = scrape(server)
    return (
        metrics.get(("crossfield_batch_structures_count", SMALL), 0),
        metrics.get(("crossfield_batch_structures_sum", SMALL), 0),
    )


def batches_settle(server, expected: tuple[int, int]) -> tuple[float, float]:
    """``batches(server)`` once it reaches ``expected`` (or 5 s later): the runner counts
    a batch just after answering it, so a caller may see its answer before the count."""
    deadline = time.monotonic() + 5.0
    while (counted := batches(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return counted


def test_a_lone_client_never_waits_for_the_delay(model) -> None:
    """An idle device takes a structure at once: a lone MD client, one structure per call,
    is not held back by a delay meant for batch-mates that are not coming."""
    with running_server({"small": model}, max_delay=5.0) as server:
        inference = stub(server)
        inference.Compute(request_for(waters(1)[0]), timeout=60)  # connected and warm
        start = time.monotonic()
        for structure in waters(5):
            inference.Compute(request_for(structure), timeout=60)
        elapsed = time.monotonic() - start
        assert batches_settle(server, (6, 6)) == (6, 6)
    assert elapsed < 2.5, f"5 calls took {elapsed:.1f} s: they waited for the 5 s delay"


def test_a_crowd_waits_for_its_batch_mates_within_the_delay(model) -> None:
    """After a batch of 4, the first of the next 4 to arrive at the idle device waits (at
    most the delay) for the 3 others instead of running alone; once the device has been
    idle longer than the delay, nobody is expected and a structure runs at once."""
    with running_server({"small": model}, max_delay=3.0) as server:
        inference = stub(server)
        with runner_held(server):
            first = [inference.Compute.future(request_for(s), timeout=60) for s in waters(4)]
            wait_queued(server, 4)
        assert all(call.result().HasField("energy") for call in first)
        assert batches_settle(server, (1, 4)) == (1, 4)
        second = []
        for structure in waters(4):  # trickling in, well within the delay
            second.append(inference.Compute.future(request_for(structure), timeout=60))
            time.sleep(0.1)
        assert all(call.result().HasField("energy") for call in second)
        assert batches_settle(server, (2, 8)) == (2, 8)
        time.sleep(3.5)  # the device idle for longer than the delay: nobody is coming
        start = time.monotonic()
        inference.Compute(request_for(waters(1)[0]), timeout=60)
        elapsed = time.monotonic() - start
        assert batches_settle(server, (3, 9)) == (3, 9)
    assert elapsed < 1.5, f"a lone structure waited {elapsed:.1f} s for batch-mates"


def test_a_full_budget_takes_the_place_behind_only_while_no_other_model_waits(model) -> None:
    """The place behind a running batch goes to a full budget only while no other batcher
    has structures waiting: otherwise a model whose batches always fill their budget would
    keep the device from every other model."""
    with running_server({"small": model, "other": model}, max_atoms=6) as server:
        inference = stub(server)
        with runner_held(server):
            full = inference.ComputeStream(iter(request_for(w) for w in waters(2)), timeout=60)
            assert next(full).HasField("energy")  # alone, it may take the place behind
            waiting = inference.Compute.future(request_for(waters(1)[0], model="other"), timeout=60)
            wait_queued(server, 1, model="other")
            more = inference.ComputeStream(iter(request_for(w) for w in waters(4)), timeout=60)
            wait_queued(server, 4)
            time.sleep(0.5)  # time enough to take the place behind, if it were allowed
            assert batches(server) == (1, 2)
        assert waiting.result().HasField("energy")
        assert len(list(more)) == 4 and len(list(full)) == 1


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("C", "diamond", a=3.57).repeat((2, 2, 2)),
        molecule("C6H6"),
        bulk("Si", "diamond", a=5.43, cubic=True).repeat((1, 1, 2)),
    ],
    ids=["Si8", "C16", "benzene", "Si16"],
)
def test_edge_estimate_is_close_for_crystals_and_an_upper_bound_for_molecules(atoms) -> None:
    structure = Structure.from_atoms(atoms)
    edges = len(neighbour_list(structure.positions, structure.cell, structure.pbc, 4.0)[0])
    estimate = estimate_neighbours(len(atoms), structure.cell, structure.pbc, 4.0) * len(atoms)
    if any(structure.pbc):
        assert 0.7 * edges < estimate < 1.4 * edges
    else:
        assert edges <= estimate


def test_a_withdrawn_structure_wakes_whoever_waits_for_it(model) -> None:
    """Withdrawing a queued structure completes its future as an executor would, so a
    thread in ``concurrent.futures.wait`` (the relaxation engine's rounds) wakes."""
    with running_server({"small": model}, max_delay=1.5) as server:
        served = server.registry.resolve("small")
        checked = check_request(served, request_for(waters(1)[0]), "pbe")
        item = WorkItem(checked)
        with runner_held(server):
            served.batcher.submit(item)
            waiter = threading.Thread(target=concurrent.futures.wait, args=([item.future],))
            waiter.start()
            served.batcher.withdraw(item)
            waiter.join(timeout=5.0)
            assert not waiter.is_alive(), "the withdrawn structure's waiter never woke"
    assert item.future.cancelled()


def _checked_items(server, structures) -> list[WorkItem]:
    """``structures`` checked for the small model, as work items not yet submitted."""
    served = server.registry.resolve("small")
    return [WorkItem(check_request(served, request_for(s), "pbe")) for s in structures]


def _submit(server, items: list[WorkItem]) -> list[WorkItem]:
    """``items`` submitted straight to the small model's batcher."""
    batcher = server.registry.resolve("small").batcher
    for item in items:
        batcher.submit(item)
    return items


def _wait_built(items: list[WorkItem]) -> None:
    deadline = time.monotonic() + 20.0
    while any(item.graph is None for item in items):
        if time.monotonic() > deadline:
            unbuilt = sum(item.graph is None for item in items)
            raise AssertionError(f"{unbuilt} of {len(items)} graphs never built ahead")
        time.sleep(0.01)


def test_graphs_of_the_next_batch_are_built_while_the_device_is_busy(model) -> None:
    """While a batch computes, the batcher's thread builds the next batch's graphs, so
    the device does not sit idle while they are built; only the next batch's (here 3
    waters fill the atom budget): the ones after it wait. The answers are those of a
    fresh evaluation."""
    structures = waters(9)
    with running_server({"small": model}, max_delay=30.0, max_atoms=9) as server:
        with runner_held(server):
            items = _submit(server, _checked_items(server, structures))
            # the first three fill a budget and take the place behind the held device;
            # the next three are the next batch: built ahead, the last three not yet
            _wait_built(items[:6])
            time.sleep(0.2)
            assert all(item.graph is None for item in items[6:])
        results = [item.future.result(timeout=60) for item in items]
    for result, expected in zip(results, evaluate(model, structures), strict=True):
        np.testing.assert_allclose(result.energy, expected["energy"], rtol=1e-10)
        np.testing.assert_allclose(result.forces, expected["forces"], rtol=0, atol=1e-10)


def test_a_graph_that_fails_ahead_fails_its_structure_alone_when_its_batch_runs(model) -> None:
    """A graph built ahead is built once (its error too), and a failure reaches only
    its own caller, when its batch runs, as if the batch had built it."""
    calls = []

    def failing(model, builder):
        calls.append(threading.current_thread().name)
        raise ValueError("positions: refused for this test")

    with running_server({"small": model}, max_delay=30.0) as server:
        with runner_held(server):
            items = _checked_items(server, waters(3))
            items[1].graph_source = failing
            _submit(server, items)
            _wait_built(items)
            assert not items[1].future.done(), "the error was given before its batch ran"
        error = items[1].future.exception(timeout=60)
        energies = [items[i].future.result(timeout=60).energy for i in (0, 2)]
    assert calls == ["batcher-small"], f"the failing graph was built by {calls}"
    assert "refused for this test" in str(error) and "structure.positions" in str(error)
    assert all(np.isfinite(energies))
