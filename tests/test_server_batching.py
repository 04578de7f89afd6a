"""The dynamic batcher on a real server: budgets, maximum delay, mixed heads, the bounded
queue, deadlines and cancellation."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from server_support import HEADS, request_for, running_server, scrape, small_model, stub

from crossfield.model import Structure, evaluate, neighbour_list
from crossfield.server.validation import estimate_neighbours

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
        responses = {r.id: r for r in stub(server).ComputeStream(iter(requests), timeout=60)}
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
        responses = list(
            stub(server).ComputeStream(iter(request_for(s) for s in waters(8)), timeout=60)
        )
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
        responses = list(stub(server).ComputeStream(iter(requests), timeout=60))
        metrics = scrape(server)
    assert len(responses) == 4
    assert metrics[("crossfield_batch_structures_count", SMALL)] == 2


def test_full_queue_answers_resource_exhausted(model) -> None:
    with running_server({"small": model}, max_delay=3.0, max_queue=2) as server:
        inference = stub(server)
        calls = [inference.Compute.future(request_for(s), timeout=60) for s in waters(2)]
        time.sleep(0.5)  # both queued, waiting for the delay
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
        with pytest.raises(grpc.RpcError) as raised:
            inference.Compute(request_for(waters(1)[0]), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = inference.ComputeStream(iter(request_for(s) for s in waters(5)), timeout=60)
        time.sleep(0.3)
        stream.cancel()
        call = inference.Compute.future(request_for(waters(1)[0]), timeout=60)
        time.sleep(0.3)
        call.cancel()
        time.sleep(2.0)  # past the batcher's delay: anything still queued would now run
        metrics = scrape(server)
    assert metrics.get(("crossfield_batch_structures_count", SMALL), 0) == 0
    statuses = {
        dict(labels)["status"]: value
        for (name, labels), value in metrics.items()
        if name == "crossfield_requests_total"
    }
    assert sum(statuses.values()) == 7 and "OK" not in statuses
    assert set(statuses) <= {"CANCELLED", "DEADLINE_EXCEEDED"}


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
