"""A real server on loopback under concurrent load: results equal in-process evaluation,
streams answer every structure exactly once, and the metrics count what was sent."""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import pytest
import torch
from server_support import (
    HEADS,
    assert_close,
    request_for,
    running_server,
    scrape,
    small_model,
    structures,
    stub,
)

from crossfield.model import evaluate
from crossfield.v1 import inference_pb2
from crossfield.v1.messages import response_results


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads spin-wait; with clients, server and batcher in one process on two
    shared cores that makes every batch wait for descheduled threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return small_model()


def properties_for(structure, index: int) -> tuple[str, ...]:
    if any(structure.pbc):
        return ("energy", "forces", "stress")
    return ("energy", "forces", "atom_energies") if index % 2 else ("energy", "forces")


def test_32_concurrent_clients_match_in_process_evaluation(model) -> None:
    work = structures(32 * 4, seed=1)
    references = [evaluate(model, [s])[0] for s in work]
    answers: dict[int, inference_pb2.ComputeResponse] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(32)

    with running_server({"small": model}, max_delay=0.02) as server:

        def client(rank: int) -> None:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    from crossfield.v1 import inference_pb2_grpc

                    inference = inference_pb2_grpc.InferenceStub(channel)
                    start.wait(timeout=30)
                    for index in range(rank, len(work), 32):
                        request = request_for(
                            work[index], properties_for(work[index], index), id=f"{rank}/{index}"
                        )
                        answers[index] = inference.Compute(request, timeout=60)
            except BaseException as err:  # surfaced in the main thread
                errors.append(err)

        threads = [threading.Thread(target=client, args=(rank,)) for rank in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        metrics = scrape(server)

    assert not errors, errors[:3]
    assert len(answers) == len(work)
    for index, (structure, reference) in enumerate(zip(work, references)):
        response = answers[index]
        assert response.id.endswith(f"/{index}")
        assert (response.model, response.version, response.head) == ("small", "1", structure.head)
        results = response_results(response)
        assert set(results) == set(properties_for(structure, index))
        assert_close(results["energy"], reference["energy"], f"energy of {index}")
        assert_close(results["forces"], reference["forces"], f"forces of {index}")
        if "stress" in results:
            assert_close(results["stress"], reference["stress"], f"stress of {index}")
        if "atom_energies" in results:
            assert_close(
                results["atom_energies"], reference["node_energy"], f"atom energies of {index}"
            )
    # 32 clients at once must actually have been batched together, heads mixed.
    batches = metrics[("crossfield_batch_structures_count", frozenset({("model", "small")}))]
    assert batches < len(work) / 2, f"{batches} batches for {len(work)} structures: no batching"


def test_stream_with_1000_in_flight_answers_each_exactly_once(model) -> None:
    work = structures(1000, seed=2)
    molecules = [s for s in work if not any(s.pbc)]
    references = evaluate(model, molecules, compute_stress=False)
    reference_by_id = {f"m{i}": r for i, r in enumerate(references)}
    requests = [request_for(s, ("energy", "forces"), id=f"m{i}") for i, s in enumerate(molecules)]
    crystals = [s for s in work if any(s.pbc)]
    requests += [request_for(s, ("energy",), id=f"c{i}") for i, s in enumerate(crystals)]
    assert len(requests) == 1000

    with running_server({"small": model}, max_delay=0.01, max_atoms=2048) as server:
        responses = list(stub(server).ComputeStream(iter(requests), timeout=300))
        metrics = scrape(server)

    counts = Counter(r.id for r in responses)
    assert len(responses) == 1000 and set(counts) == {r.id for r in requests}
    assert max(counts.values()) == 1
    for response in responses:
        assert response.status.code == 0, response.status.message
        if response.id.startswith("m"):
            reference = reference_by_id[response.id]
            assert_close(response.energy, reference["energy"], response.id)
            assert_close(response_results(response)["forces"], reference["forces"], response.id)
        else:
            assert response.HasField("energy") and not response.HasField("forces")
    ok = sum(
        v
        for (name, labels), v in metrics.items()
        if name == "crossfield_requests_total" and ("status", "OK") in labels
    )
    assert ok == 1000


def test_metrics_count_what_was_sent(model) -> None:
    work = structures(12, seed=3)
    sent = Counter()
    atoms = Counter()
    with running_server({"small": model}) as server:
        inference = stub(server)
        for structure in work:
            inference.Compute(request_for(structure), timeout=60)
            sent[(structure.head, "OK")] += 1
            atoms[structure.head] += len(structure.numbers)
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                bad = request_for(work[0])
                bad.structure.positions.shape[:] = [1, 3]
                inference.Compute(bad, timeout=60)
            sent[(work[0].head, "INVALID_ARGUMENT")] += 1
        with pytest.raises(grpc.RpcError):
            inference.Compute(request_for(work[0], model="nope"), timeout=60)
        metrics = scrape(server)

    requests = {
        (dict(labels)["head"], dict(labels)["status"]): value
        for (name, labels), value in metrics.items()
        if name == "crossfield_requests_total" and dict(labels)["model"] == "small"
    }
    assert requests == dict(sent)
    unknown = frozenset({("model", "-"), ("version", "-"), ("head", "-"), ("status", "NOT_FOUND")})
    assert metrics[("crossfield_requests_total", unknown)] == 1
    for head in HEADS:
        key = ("crossfield_atoms_evaluated_total", frozenset({("model", "small"), ("head", head)}))
        assert metrics.get(key, 0) == atoms[head]
    small = frozenset({("model", "small")})
    version = small | {("version", "1")}
    assert metrics[("crossfield_batch_structures_sum", small)] == len(work)
    assert metrics[("crossfield_batch_atoms_sum", small)] == sum(atoms.values())
    assert metrics[("crossfield_queue_seconds_count", version)] == len(work)
    assert metrics[("crossfield_request_seconds_count", version)] == len(work)
    assert metrics[("crossfield_compute_seconds_count", version)] >= 1
    assert metrics[("crossfield_queue_depth", version)] == 0
    loaded = frozenset(
        {("model", "small"), ("version", "1"), ("dtype", "float64"), ("device", "cpu")}
    )
    assert metrics[("crossfield_model_loaded", loaded)] == 1
