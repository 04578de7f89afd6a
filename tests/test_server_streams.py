"""ComputeStream on the asyncio server, against a real server on loopback: the memory a
stream holds is bounded when its client does not read, results count OK only once
written, cancelling withdraws queued work, deadlines and cancellations are counted apart,
and stopping ends streams at once with a status that says to resume elsewhere."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from ase.build import bulk, molecule
from hotload_support import wait_for
from server_support import (
    request_for,
    runner_held,
    running_server,
    scrape,
    small_model,
    wait_queued,
)

from crossfield.model import Structure
from crossfield.server.streams import StreamLimits
from crossfield.v1 import inference_pb2_grpc

SMALL = frozenset({("model", "small"), ("version", "1")})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return small_model(seed=5)


def statuses(metrics) -> Counter:
    """crossfield_requests_total by status."""
    found: Counter = Counter()
    for (name, labels), value in metrics.items():
        if name == "crossfield_requests_total":
            found[dict(labels)["status"]] += value
    return found


def evaluated(metrics) -> float:
    return metrics.get(("crossfield_batch_structures_sum", frozenset({("model", "small")})), 0)


def queued(metrics) -> float:
    """Structures waiting in the queues of every version of model "small"."""
    return sum(
        value
        for (name, labels), value in metrics.items()
        if name == "crossfield_queue_depth" and dict(labels)["model"] == "small"
    )


def stall(server) -> dict | None:
    """The metrics once evaluation has made no progress for a second (None before)."""
    before = scrape(server)
    time.sleep(1.0)
    after = scrape(server)
    return after if evaluated(after) and evaluated(after) == evaluated(before) else None


def crystal() -> Structure:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))  # 64 atoms
    atoms.rattle(0.05, seed=1)
    return Structure.from_atoms(atoms, head="pbe")


def ethanol() -> Structure:
    return Structure.from_atoms(molecule("CH3CH2OH"), head="r2scan")


def channel_for(server, **options) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.port}", options=list(options.items()))


def test_an_unread_stream_holds_a_bounded_window_and_counts_only_what_it_delivered(
    model,
) -> None:
    structure = crystal()
    count = 120
    requests = [
        request_for(structure, ("energy", "forces", "atom_energies"), id=str(i))
        for i in range(count)
    ]
    window = 64 * 1024
    limits = StreamLimits(idle_timeout=60.0, window_bytes=window)
    with running_server({"small": model}, settings={"streams": limits}, max_delay=0.0) as server:
        # Without BDP probing the client's HTTP/2 receive window stays at 64 KiB, so what
        # the server can write before the client reads is small and known.
        channel = channel_for(server, **{"grpc.http2.bdp_probe": 0})
        call = inference_pb2_grpc.InferenceStub(channel).ComputeStream(iter(requests), timeout=120)
        stalled = wait_for(lambda: stall(server), "the unread stream to stall", timeout=60)
        responses = list(call)
        final = scrape(server)

    done = evaluated(stalled)
    # ~30 answers fill the client's 64 KiB window, ~10 structures the stream's own window
    assert done < 80, f"{done} of {count} structures evaluated for an unread stream"
    assert stalled[("crossfield_stream_held_bytes", frozenset())] <= window + 3 * 4096
    assert statuses(stalled)["OK"] < done, "results counted OK before they were written"
    assert sorted(int(r.id) for r in responses) == list(range(count))
    assert all(r.status.code == 0 and len(r.forces.data) for r in responses)
    assert statuses(final) == Counter({"OK": count})
    assert final[("crossfield_stream_held_bytes", frozenset())] == 0
    assert final[("crossfield_streams_ended_total", frozenset({("reason", "completed")}))] == 1


def test_a_stream_never_read_is_ended_after_the_idle_timeout(model) -> None:
    structure = crystal()
    requests = [request_for(structure, ("energy", "forces"), id=str(i)) for i in range(100)]
    limits = StreamLimits(idle_timeout=1.0, window_bytes=64 * 1024)
    with running_server({"small": model}, settings={"streams": limits}, max_delay=0.0) as server:
        channel = channel_for(server, **{"grpc.http2.bdp_probe": 0})
        call = inference_pb2_grpc.InferenceStub(channel).ComputeStream(iter(requests), timeout=60)
        key = ("crossfield_streams_ended_total", frozenset({("reason", "unread")}))
        wait_for(lambda: scrape(server).get(key), "the unread stream to be ended", timeout=20)
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                received.append(response)
        metrics = scrape(server)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stream not read" in raised.value.details()
    counted = statuses(metrics)
    # what was written counts OK (and arrived); what the server read but never delivered
    # counts with the status the stream ended with
    assert counted["OK"] == len(received)
    assert set(counted) == {"OK", "UNAVAILABLE"}
    assert metrics[("crossfield_open_streams", frozenset())] == 0


def test_cancelling_a_stream_withdraws_its_queued_structures(model) -> None:
    count = 400
    requests = [request_for(ethanol(), id=str(i)) for i in range(count)]
    # two ethanols per batch: most of the stream is still queued when it is cancelled
    with running_server({"small": model}, max_delay=0.0, max_atoms=18) as server:
        with runner_held(server):  # most of the stream queues before anything runs
            call = inference_pb2_grpc.InferenceStub(channel_for(server)).ComputeStream(
                iter(requests), timeout=60
            )
            wait_queued(server, 150)
        read = [next(call) for _ in range(5)]
        call.cancel()
        depth = ("crossfield_queue_depth", SMALL)
        wait_for(lambda: scrape(server)[depth] == 0 or None, "the queue to empty", timeout=5)
        time.sleep(1.0)  # anything of the stream still queued would now run
        metrics = scrape(server)
    counted = statuses(metrics)
    admitted = sum(counted.values())
    assert len(read) == 5 and counted["OK"] >= 5
    assert set(counted) <= {"OK", "CANCELLED"}
    assert admitted > 100, f"only {admitted} structures reached the server"
    assert evaluated(metrics) < admitted / 2, "cancelled structures were still evaluated"
    ended = ("crossfield_streams_ended_total", frozenset({("reason", "cancelled")}))
    assert metrics[ended] == 1


def test_deadlines_and_cancellations_are_counted_apart(model) -> None:
    water = request_for(Structure.from_atoms(molecule("H2O"), head="pbe"))
    with running_server({"small": model}, max_delay=3.0) as server, runner_held(server):
        inference = inference_pb2_grpc.InferenceStub(channel_for(server))
        # Deadlines long enough for a loaded machine to admit every structure before them.
        with pytest.raises(grpc.RpcError) as raised:
            inference.Compute(water, timeout=1.0)  # waits for the busy device past its deadline
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as raised:
            list(inference.ComputeStream(iter([water] * 4), timeout=2.0))
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = inference.Compute.future(water, timeout=30)
        wait_for(lambda: queued(scrape(server)) == 1 or None, "the request queued", 10)
        call.cancel()
        wait_for(lambda: sum(statuses(scrape(server)).values()) == 6 or None, "six counts", 5)
        metrics = scrape(server)
    assert statuses(metrics) == Counter({"DEADLINE_EXCEEDED": 5, "CANCELLED": 1})
    assert evaluated(metrics) == 0


def test_stopping_ends_open_streams_at_once_with_unavailable(model) -> None:
    water = request_for(Structure.from_atoms(molecule("H2O"), head="pbe"), id="w")
    with running_server({"small": model}, settings={"grace": 20.0}) as server:
        requests: queue.Queue = queue.Queue()
        call = inference_pb2_grpc.InferenceStub(channel_for(server)).ComputeStream(
            iter(requests.get, None), timeout=60
        )
        requests.put(water)
        assert next(call).id == "w"  # answered; the stream stays open, idle
        start = time.monotonic()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        stopper.join(timeout=30)
        elapsed = time.monotonic() - start
        requests.put(None)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server stopping" in raised.value.details()
    assert elapsed < 10.0, f"stopping took {elapsed:.1f} s: the open stream held it"
