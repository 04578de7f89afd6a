"""Clients against real servers that fail: a server restarted again and again under a
``compute_many`` (every structure answered exactly once, the run never hangs), a client
started before its server (it waits, within its deadline), and a full queue (retried
with backoff by the channel's retry policy)."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import numpy as np
import pytest
import torch
from ase.build import molecule
from client_support import copper_crystal, free_port, mixed_structures, small_model

from crossfield.client import AsyncClient, Client, RetryPolicy, ServerUnavailableError
from crossfield.model import Structure, evaluate
from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.batcher import BatchLimits

# Restarts here are the test's doing, not a structure's: poison control (which would fail
# a structure that happens to be in flight alone at two restarts) is tested on its own.
RESTART_RETRIES = RetryPolicy(
    attempts=100, initial_backoff=0.01, max_backoff=0.1, poison_after=None
)


@pytest.fixture(scope="module")
def model():
    return small_model()


def serve_on(port: int, model, max_queue: int = 4096, max_delay: float = 0.0005):
    """A real server for ``model`` on a fixed loopback port (so that it can come back)."""
    config = ServerConfig(
        host="127.0.0.1",
        port=port,
        metrics_port=None,
        device="cpu",
        dtype=torch.float64,
        limits=BatchLimits(max_delay=max_delay, max_queue=max_queue),
        grace=5.0,
    )
    server = InferenceServer(config)
    server.add_model(copy.deepcopy(model), "small", "1")
    return server.start()


class SlowlyRead:
    """A structure that takes a few milliseconds to read (a lazy reader on a network file
    system): turning it into a request takes time, during which its stream may close."""

    def __init__(self, atoms, seconds: float = 0.003) -> None:
        self._atoms = atoms
        self._seconds = seconds

    def __getattr__(self, name: str):
        if name in ("numbers", "positions"):
            time.sleep(self._seconds)
        return getattr(self._atoms, name)


def restart_while(running, server, port: int, model, progress, restarts: int):
    """Restart ``server`` ``restarts`` times, each once ``progress()`` has moved on by a
    few structures since the last restart; returns the server that runs at the end."""
    done = 0
    while done < restarts and running():
        mark = progress()
        deadline = time.monotonic() + 30
        while running() and progress() < mark + 15 and time.monotonic() < deadline:
            time.sleep(0.005)
        if not running():
            break
        server.stop(grace=0)
        server = serve_on(port, model)
        done += 1
    return server, done


def check_answers(model, structures, results) -> None:
    indices = sorted(r.index for r in results)
    assert indices == list(range(len(structures))), "an index missing or answered twice"
    failed = [(r.index, r.error) for r in results if not r.ok]
    assert not failed, failed[:3]
    expected = evaluate(model, [Structure.from_atoms(a) for a in structures])
    for result in results:
        want = float(expected[result.index]["energy"])
        assert result.energy == pytest.approx(want, rel=1e-10)


def test_compute_many_answers_every_structure_once_across_server_restarts(model) -> None:
    port = free_port()
    structures = mixed_structures(160, seed=5)
    results = []

    def consume() -> None:
        address = f"127.0.0.1:{port}"
        with Client(address, retries=RESTART_RETRIES, timeout=30) as client:
            lazy = [SlowlyRead(a) for a in structures]
            results.extend(client.compute_many(lazy, max_in_flight=8, ordered=False))

    server = serve_on(port, model)
    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        server, restarts = restart_while(
            reader.is_alive, server, port, model, lambda: len(results), restarts=5
        )
        reader.join(timeout=60)
    finally:
        server.stop(grace=0)
    assert not reader.is_alive(), f"compute_many hung: {len(results)} of {len(structures)} answered"
    assert restarts >= 3, f"the run ended after {restarts} restarts; the test needs more"
    check_answers(model, structures, results)


def test_async_compute_many_answers_every_structure_once_across_server_restarts(model) -> None:
    port = free_port()
    structures = mixed_structures(120, seed=6)
    results = []

    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{port}", retries=RESTART_RETRIES, timeout=30) as c:
            lazy = [SlowlyRead(a) for a in structures]
            async for result in c.compute_many(lazy, max_in_flight=8, ordered=False):
                results.append(result)

    server = serve_on(port, model)
    reader = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    reader.start()
    try:
        server, restarts = restart_while(
            reader.is_alive, server, port, model, lambda: len(results), restarts=4
        )
        reader.join(timeout=60)
    finally:
        server.stop(grace=0)
    assert not reader.is_alive(), f"compute_many hung: {len(results)} of {len(structures)} answered"
    assert restarts >= 3, f"the run ended after {restarts} restarts; the test needs more"
    check_answers(model, structures, results)


def test_a_client_started_before_its_server_waits_for_it(model) -> None:
    port = free_port()
    answers: list = []

    def call() -> None:
        with Client(f"127.0.0.1:{port}", timeout=30, retries=2) as client:
            answers.append(client.compute(molecule("H2O")).energy)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.5)  # longer than the retries' backoff: only waiting for ready gets there
    assert caller.is_alive() and not answers
    server = serve_on(port, model)
    try:
        caller.join(timeout=30)
    finally:
        server.stop(grace=0)
    assert answers and np.isfinite(answers[0])


def test_no_server_within_the_deadline_is_unavailable_naming_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(address, timeout=1.0) as client, pytest.raises(ServerUnavailableError) as caught:
        client.compute(molecule("H2O"))
    assert time.monotonic() - started >= 1.0
    assert address in str(caught.value) and "within 1.0 s" in str(caught.value)


def test_a_full_queue_is_retried_with_backoff_until_it_has_room(model) -> None:
    """RESOURCE_EXHAUSTED (a queue of 2 and 8 callers) is retried by the channel's
    service-config retry policy: every call is answered."""
    port = free_port()
    server = serve_on(port, model, max_queue=2, max_delay=0.02)
    atoms = copper_crystal((2, 2, 2))
    retries = RetryPolicy(attempts=5, initial_backoff=0.2, max_backoff=2.0)
    failures, answers = [], []
    try:
        with Client(f"127.0.0.1:{port}", retries=retries, timeout=60) as client:

            def hammer() -> None:
                for _ in range(3):
                    try:
                        answers.append(client.compute(atoms).energy)
                    except Exception as err:  # every failure counts
                        failures.append(err)

            threads = [threading.Thread(target=hammer) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        refused = sum(
            sample.value
            for metric in server.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "crossfield_requests_total"
            and sample.labels.get("status") == "RESOURCE_EXHAUSTED"
        )
    finally:
        server.stop(grace=0)
    assert refused > 0, "the queue never filled: the test did not exercise the retries"
    assert not failures, failures[:3]
    assert len(answers) == 24


def _first_pick_is(monkeypatch, pool_class, index: int) -> None:
    """Every fresh call's first ``pick`` returns connection ``index``, whatever its state:
    the race in which ``pick`` saw a replica up an instant before it went away (retries,
    ``pick(after=...)``, choose as usual)."""
    original = pool_class.pick
    if asyncio.iscoroutinefunction(original):

        async def pick(self, deadline, after=None):
            if after is None:
                return self.connections[index]
            return await original(self, deadline, after)

    else:

        def pick(self, deadline, after=None):
            if after is None:
                return self.connections[index]
            return original(self, deadline, after)

    monkeypatch.setattr(pool_class, "pick", pick)


def test_a_call_sent_to_a_replica_that_just_went_away_moves_on_at_once(model, monkeypatch) -> None:
    """Two replicas, the first gone; each call is first sent to it (``_first_pick_is``).
    Compute, an MD session's first step, a relaxation (its first evaluation) and the async
    client's Compute are answered by the second replica at once, not after waiting for the
    gone one until their deadline (a waiting call on a channel whose server is gone waits
    for it to come back). A call that never left the client does not count towards poison
    control: with ``poison_after=1`` each would otherwise fail as poison."""
    from crossfield.client.aio import AsyncRoundRobin
    from crossfield.client.connection import RoundRobin

    gone_port, live_port = free_port(), free_port()
    gone = serve_on(gone_port, model)
    live = serve_on(live_port, model)
    addresses = [f"127.0.0.1:{gone_port}", f"127.0.0.1:{live_port}"]
    atoms = molecule("H2O")
    expected = float(evaluate(model, [Structure.from_atoms(atoms, head="pbe")])[0]["energy"])
    timeout = 20.0
    retries = RetryPolicy(poison_after=1)
    try:
        with Client(addresses, head="pbe", timeout=timeout, retries=retries) as client:
            client.compute(atoms)  # both replicas were up
            client.compute(atoms)
            gone.stop(grace=0)
            _first_pick_is(monkeypatch, RoundRobin, 0)
            answers = {}
            for name, call in (
                ("Compute", lambda: client.compute(atoms).energy),
                ("session", lambda: client.session().compute(atoms, ("energy",)).energy),
            ):
                started = time.monotonic()
                answers[name] = (call(), time.monotonic() - started)
            started = time.monotonic()
            [relaxed] = client.relax_many([atoms], fmax=10.0, max_steps=0)
            assert relaxed.error is None, relaxed.error
            answers["relaxation"] = (relaxed.energy, time.monotonic() - started)

        async def async_compute() -> float:
            async with AsyncClient(
                addresses, head="pbe", timeout=timeout, retries=retries
            ) as client:
                return (await client.compute(atoms)).energy

        _first_pick_is(monkeypatch, AsyncRoundRobin, 0)
        started = time.monotonic()
        answers["async Compute"] = (asyncio.run(async_compute()), time.monotonic() - started)
    finally:
        live.stop(grace=0)
        gone.stop(grace=0)
    for name, (energy, seconds) in answers.items():
        assert np.isclose(energy, expected, rtol=1e-10, atol=0.0), name
        assert seconds < timeout / 4, f"{name} waited {seconds:.1f} s for the gone replica"
