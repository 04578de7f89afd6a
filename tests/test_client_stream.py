"""Client.compute_many and AsyncClient against real servers: same numbers as in-process,
input order, per-structure failures, round-robin over servers, a dead server survived."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import server_support
from ase.build import molecule
from client_support import free_port, mixed_structures, running_server, small_model

from crossfield.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    InvalidStructureError,
    RetryPolicy,
)
from crossfield.model import Structure, evaluate

FAST_RETRIES = RetryPolicy(attempts=3, initial_backoff=0.02, max_backoff=0.1)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def two_servers(model):
    """The same model served by two servers as versions "a" and "b"."""
    with running_server(model, version="a") as first, running_server(model, version="b") as second:
        yield first, second


def reference(model, structures, head: str = "pbe") -> list[dict[str, np.ndarray]]:
    return evaluate(model, [Structure.from_atoms(a, head=head) for a in structures])


def assert_matches(result, expected, periodic: bool) -> None:
    assert result.ok, result.error
    assert result.energy == pytest.approx(float(expected["energy"]), rel=1e-10)
    np.testing.assert_allclose(result.forces, expected["forces"], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(result.energies, expected["node_energy"], rtol=1e-9, atol=1e-11)
    if periodic:
        np.testing.assert_allclose(result.stress, expected["stress"], rtol=1e-9, atol=1e-11)
    else:
        assert result.stress is None


def test_compute_many_in_order_with_failures_reported(model, two_servers) -> None:
    structures = mixed_structures(60)
    bad = {7: 92, 33: 94}  # uranium and plutonium are not in the element table
    for index, number in bad.items():
        structures[index].numbers[0] = number
    with Client(two_servers[0], head="r2scan") as client:
        results = list(
            client.compute_many(
                structures, ["energy", "forces", "stress", "energies"], max_in_flight=8
            )
        )
    assert [r.index for r in results] == list(range(len(structures)))
    good = [i for i in range(len(structures)) if i not in bad]
    expected = reference(model, [structures[i] for i in good], head="r2scan")
    for index, want in zip(good, expected):
        assert_matches(results[index], want, periodic=structures[index].pbc.any())
        assert results[index].head == "r2scan"
    for index, number in bad.items():
        error = results[index].error
        assert isinstance(error, InvalidStructureError) and str(number) in error.details


def test_unordered_results_come_exactly_once_and_spread_over_servers(model, two_servers) -> None:
    structures = mixed_structures(80, seed=1)
    with Client(list(two_servers)) as client:
        results = list(client.compute_many(iter(structures), ordered=False, max_in_flight=16))
    assert sorted(r.index for r in results) == list(range(len(structures)))
    assert {r.version for r in results} == {"a", "b"}  # both servers did work
    expected = reference(model, structures)
    for result in results:
        np.testing.assert_allclose(result.forces, expected[result.index]["forces"], atol=1e-10)


def test_unary_calls_go_round_robin(two_servers) -> None:
    with Client(list(two_servers)) as client:
        versions = [client.compute(molecule("H2O")).version for _ in range(4)]
    assert versions == ["a", "b", "a", "b"]


def test_a_dead_server_is_given_up_and_the_live_one_does_the_work(model, two_servers) -> None:
    structures = mixed_structures(30, seed=2)
    addresses = [f"127.0.0.1:{free_port()}", two_servers[1]]
    with Client(addresses, retries=FAST_RETRIES) as client:
        results = list(client.compute_many(structures, max_in_flight=8))
        assert all(r.ok for r in results) and {r.version for r in results} == {"b"}
        # a unary call to the dead address moves on to the next one
        assert client.compute(molecule("CH4")).version == "b"
    expected = reference(model, structures)
    for result, want in zip(results, expected):
        assert result.energy == pytest.approx(float(want["energy"]), rel=1e-10)


def test_no_server_at_all_raises_once_the_wait_for_one_is_over() -> None:
    client = Client(f"127.0.0.1:{free_port()}", retries=FAST_RETRIES, timeout=1.0)
    with client, pytest.raises(ConnectionError, match="no server reachable within 1.0 s"):
        list(client.compute_many(mixed_structures(3)))


def test_stopping_early_cancels_the_streams(two_servers) -> None:
    with Client(two_servers[0]) as client:
        results = client.compute_many(mixed_structures(200), max_in_flight=4)
        first = [next(results) for _ in range(5)]
        results.close()
        assert [r.index for r in first] == list(range(5))
        assert client.compute(molecule("H2O")).ok  # the channel still serves


def test_auth_error_maps_from_status() -> None:
    from crossfield.client.errors import error_for

    error = error_for("UNAUTHENTICATED", "missing bearer token")
    assert isinstance(error, AuthenticationError) and isinstance(error, PermissionError)
    assert error.code == "UNAUTHENTICATED" and "missing bearer token" in str(error)


def test_async_client(model, two_servers) -> None:
    structures = mixed_structures(40, seed=3)
    structures[5].numbers[0] = 92

    async def main():
        async with AsyncClient(list(two_servers), head="pbe") as client:
            single = await client.compute(structures[0], ["energy", "forces", "stress"])
            many = [r async for r in client.compute_many(structures, max_in_flight=8)]
            models = await client.list_models()
        return single, many, models

    single, many, models = asyncio.run(main())
    expected = reference(model, [s for i, s in enumerate(structures) if i != 5])
    expected.insert(5, None)
    assert single.energy == pytest.approx(float(expected[0]["energy"]), rel=1e-10)
    assert [r.index for r in many] == list(range(len(structures)))
    assert isinstance(many[5].error, InvalidStructureError)
    assert {r.version for r in many if r.ok} == {"a", "b"}
    for result, want in zip(many, expected):
        if want is not None:
            np.testing.assert_allclose(result.forces, want["forces"], rtol=1e-9, atol=1e-11)
    assert [m.name for m in models.models] == ["small"]


SYNC_RUNS, ASYNC_RUNS = 2, 5


def test_a_finished_run_ends_its_streams_as_completed_calls(model) -> None:
    """Every structure answered: the sync and async clients end their streams by sending
    no more (the server ends them OK), not by cancelling them, so the server counts every
    answer the client got as OK. (A cancel that crossed the last answer on the wire once
    made a soak's server count 749 OK answers against the clients' 750.) The async
    client's cancel races the server's end of the stream (a run with it cancelling was
    caught 1 time in 3), hence several runs."""
    structures = mixed_structures(12, seed=5)
    with server_support.running_server({"small": model}) as server:
        address = f"127.0.0.1:{server.port}"
        with Client(address, head="pbe") as client:
            for _ in range(SYNC_RUNS):
                assert all(r.ok for r in client.compute_many(structures, max_in_flight=4))

        async def many() -> list:
            async with AsyncClient(address, head="pbe") as client:
                return [r async for r in client.compute_many(structures, max_in_flight=4)]

        for _ in range(ASYNC_RUNS):
            assert all(r.ok for r in asyncio.run(many()))
        counts = server_support.scrape(server)

    def ended(reason: str) -> float:
        return counts.get(("crossfield_streams_ended_total", frozenset({("reason", reason)})), 0)

    answered = sum(
        value
        for (name, labels), value in counts.items()
        if name == "crossfield_requests_total" and ("status", "OK") in labels
    )
    runs = SYNC_RUNS + ASYNC_RUNS
    assert (ended("completed"), ended("cancelled")) == (runs, 0)
    assert answered == runs * len(structures)
