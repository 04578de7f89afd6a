"""Poison control in the client, against real server processes: a structure that takes
servers down is not replayed on every replica (issue 15: one killed 3 of 3), and one the
server marked as poison is never retried and reaches the caller with the reason."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from ase.build import molecule
from client_support import mixed_structures
from poison_support import (
    KILLER_ATOMS,
    MARK_REASON,
    MARKED_ATOMS,
    MARKED_LINE,
    hydrogen_chain,
    poisoned_servers,
)

from crossfield.client import (
    AsyncClient,
    Client,
    PoisonStructureError,
    RemoteCalculator,
    RetryPolicy,
)
from crossfield.client.connection import SUSPECT_S

RETRIES = RetryPolicy(attempts=6, initial_backoff=0.01, max_backoff=0.05)


def assert_two_of_three_died(servers, named: tuple[str, ...]) -> None:
    """The two servers a poison error names died; the third lives."""
    assert len(named) == 2, named
    for server in servers:
        if server.address in named:
            assert server.died_within(10), f"{server.address} named but alive"
        else:
            assert server.process.poll() is None, f"{server.address} died too"


def test_a_structure_that_takes_servers_down_is_not_sent_to_a_third() -> None:
    """Unary calls (what RemoteCalculator makes): the killer takes down two of three
    servers, then fails; a structure the server marked as poison is never retried and the
    caller gets the server's reason (three server processes cost seconds: one test)."""
    with poisoned_servers(3) as servers:
        addresses = [s.address for s in servers]
        with Client(addresses, retries=RETRIES, timeout=30) as client:
            assert client.compute(molecule("H2O")).ok
            with pytest.raises(PoisonStructureError) as caught:
                client.compute(hydrogen_chain(KILLER_ATOMS))
            assert_two_of_three_died(servers, caught.value.servers)
            assert "2 servers went away" in str(caught.value)
            assert isinstance(caught.value, ValueError)  # an InvalidStructureError
            assert client.compute(molecule("CH4")).ok  # the survivor serves the rest

            with pytest.raises(PoisonStructureError) as marked:
                client.compute(hydrogen_chain(MARKED_ATOMS))
            assert marked.value.reason == MARK_REASON
            assert marked.value.code == "INVALID_ARGUMENT"

        async def marked_async() -> PoisonStructureError:
            async with AsyncClient(addresses, retries=RETRIES, timeout=30) as aio:
                with pytest.raises(PoisonStructureError) as caught:
                    await aio.compute(hydrogen_chain(MARKED_ATOMS))
                return caught.value

        assert asyncio.run(marked_async()).reason == MARK_REASON
        arrivals = sum("".join(s.output).count(MARKED_LINE) for s in servers)
    assert arrivals == 2, f"the marked structure reached a server {arrivals} times in 2 calls"


def test_compute_many_answers_the_poison_with_an_error_and_everything_else() -> None:
    """Streams and MD sessions: the killer is answered with the client's verdict, a
    structure the server marked as poison with the server's reason (the per-item status's
    ``poison``, where a unary call has its trailer), once, and everything else normally."""
    structures = mixed_structures(40, seed=8)
    structures[17] = hydrogen_chain(KILLER_ATOMS)
    structures[29] = hydrogen_chain(MARKED_ATOMS)
    with poisoned_servers(3) as servers:
        addresses = [s.address for s in servers]
        with Client(addresses, retries=RETRIES, timeout=30) as client:
            results = list(client.compute_many(structures, max_in_flight=12))
            atoms = hydrogen_chain(MARKED_ATOMS)
            atoms.calc = RemoteCalculator(client)
            with pytest.raises(PoisonStructureError) as marked:
                atoms.get_potential_energy()
            assert atoms.calc.uses_session
        assert [r.index for r in results] == list(range(len(structures)))
        assert isinstance(results[17].error, PoisonStructureError)
        assert_two_of_three_died(servers, results[17].error.servers)
        arrivals = sum("".join(s.output).count(MARKED_LINE) for s in servers)
    assert isinstance(results[29].error, PoisonStructureError)
    assert results[29].error.reason == MARK_REASON
    assert results[29].error.code == "INVALID_ARGUMENT"
    assert marked.value.reason == MARK_REASON
    assert arrivals == 2  # once in the stream, once in the session: neither retried
    failed = [(r.index, r.error) for r in results if not r.ok and r.index not in (17, 29)]
    assert not failed, failed[:3]  # those in flight beside it were answered


def test_a_probe_that_times_out_on_a_live_server_does_not_shut_it_out() -> None:
    """After an UNAVAILABLE the client probes the server (``Connection.answers``); a probe
    that times out because the server is frozen (or the machine is busy) counts it down.
    Once it answers again, calls must reach it: its channel stayed connected, so no state
    change would ever clear the mark (measured before the fix: every call then waited for
    its whole deadline, "no server reachable ... (reachable now)")."""
    with poisoned_servers(1) as servers:
        process = servers[0].process
        with Client(servers[0].address, retries=RETRIES, timeout=20) as client:
            assert client.compute(molecule("H2O")).ok
            connection = client._servers.connections[0]
            os.kill(process.pid, signal.SIGSTOP)
            try:
                assert not connection.answers()  # the 1 s probe times out
            finally:
                os.kill(process.pid, signal.SIGCONT)
            start = time.monotonic()
            assert client.compute(molecule("CH4")).ok
            # The mark lasts SUSPECT_S; a wait wakes at least that often.
            assert time.monotonic() - start < 3 * SUSPECT_S
