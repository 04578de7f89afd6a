"""A Relax stream's limits, through a real server on loopback: a client that sends and
never reads holds a bounded window and then loses the call; an idle stream is ended; a
trajectory that could not fit in one message is refused alone, before any work."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from ase.build import bulk, molecule
from hotload_support import wait_for
from server_support import running_server, scrape, small_model
from soak_support import load_soak

from crossfield.client import Client
from crossfield.client.relax import relax_request
from crossfield.model import save_checkpoint
from crossfield.server.streams import StreamLimits
from crossfield.v1 import relax_pb2_grpc

NAMES = {"model": "small"}
STEPS = ("crossfield_relax_steps_total", frozenset({("model", "small")}))  # scraped key


def stub_for(server, **options) -> relax_pb2_grpc.RelaxationStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=list(options.items()))
    return relax_pb2_grpc.RelaxationStub(channel)


def finished(metrics) -> float:
    """Relaxations the engine has ended, whatever their status."""
    return sum(
        value
        for (name, _), value in metrics.items()
        if name == "crossfield_relaxations_finished_total"
    )


def in_flight(metrics) -> float:
    return (
        metrics[("crossfield_relaxations_in_flight", frozenset())]
        + metrics[("crossfield_relaxations_queued", frozenset())]
    )


def relax_steps(server) -> float:
    return server.metrics.registry.get_sample_value(
        "crossfield_relax_steps_total", {"model": "small"}
    )


def ethanols(count: int) -> list:
    """``count`` ethanol molecules, each rattled its own way (a relaxation each)."""
    structures = []
    for seed in range(count):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)
    return structures


def silicon(seed: int):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)  # 8 atoms
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_an_unread_stream_holds_a_bounded_window_then_loses_the_call() -> None:
    count = 200
    # every answer carries 12 frames of 8 atoms (~8 KiB): a few fill each window
    settings = {"fmax": 1e-6, "max_steps": 10, "trajectory_every": 1}
    requests = [relax_request(silicon(i), str(i), settings, NAMES) for i in range(count)]
    limits = StreamLimits(idle_timeout=2.0, window_bytes=64 * 1024)
    with running_server({"small": small_model()}, settings={"streams": limits}) as server:
        # Without BDP probing the client's HTTP/2 receive window stays at 64 KiB.
        call = stub_for(server, **{"grpc.http2.bdp_probe": 0}).Relax(iter(requests), timeout=60)
        key = ("crossfield_streams_ended_total", frozenset({("reason", "unread")}))
        wait_for(lambda: scrape(server).get(key), "the unread stream to be ended", timeout=30)
        received = []
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                received.append(response)
        metrics = scrape(server)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "relax stream not read" in raised.value.details()
    # ~8 structures in the stream's own window and ~8 answers in the transport's
    assert finished(metrics) < 30, f"{finished(metrics)} of {count} relaxed for nobody"
    assert 0 < len(received) < 30
    assert all(len(r.trajectory) == r.steps + 1 for r in received)
    assert in_flight(metrics) == 0
    assert metrics[("crossfield_stream_held_bytes", frozenset())] == 0
    assert metrics[("crossfield_open_streams", frozenset())] == 0


def test_an_idle_stream_is_ended_but_not_while_it_relaxes() -> None:
    (atoms,) = ethanols(1)
    slow = relax_request(atoms, "slow", {"fmax": 1e-9, "max_steps": 400}, NAMES)
    limits = StreamLimits(idle_timeout=0.5)
    outbox: queue.Queue = queue.Queue()
    with running_server({"small": small_model()}, settings={"streams": limits}) as server:
        call = stub_for(server).Relax(iter(outbox.get, None), timeout=60)
        outbox.put(slow)
        answer = next(call)  # relaxing for longer than the idle timeout: not idle
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        outbox.put(None)
    assert answer.id == "slow" and answer.status.code == 0 and answer.steps == 400
    assert answer.seconds > 2 * limits.idle_timeout
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "relax stream idle" in raised.value.details()


def test_a_trajectory_too_big_for_one_message_is_refused_alone() -> None:
    many_frames = {"fmax": 1e-6, "max_steps": 2000, "trajectory_every": 1}
    few_frames = {"fmax": 1e-6, "max_steps": 5, "trajectory_every": 1}
    requests = [
        relax_request(silicon(0), "huge", many_frames, NAMES),  # 2002 frames of ~0.7 KiB > 1 MiB
        relax_request(silicon(1), "small", few_frames, NAMES),
    ]
    settings = {"max_message_bytes": 1 << 20}
    with running_server({"small": small_model()}, settings=settings) as server:
        answers = {r.id: r for r in stub_for(server).Relax(iter(requests), timeout=60)}
        metrics = scrape(server)
    refused = answers["huge"].status
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.message.startswith("settings.trajectory_every: up to 2002 frames of 8 atoms")
    assert answers["small"].status.code == 0 and len(answers["small"].trajectory) == 6
    assert finished(metrics) == 1  # the refused one never started


def test_stopping_answers_each_relaxation_with_its_last_state_then_ends_the_stream() -> None:
    (atoms,) = ethanols(1)
    never = relax_request(atoms, "never", {"fmax": 1e-12, "max_steps": 100000}, NAMES)
    outbox: queue.Queue = queue.Queue()
    with running_server({"small": small_model()}, settings={"grace": 20.0}) as server:
        call = stub_for(server).Relax(iter(outbox.get, None), timeout=60)
        outbox.put(never)
        wait_for(lambda: scrape(server).get(STEPS, 0) > 5 or None, "some steps", timeout=30)
        start = time.monotonic()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        answers = []
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                answers.append(response)
        stopper.join(timeout=30)
        elapsed = time.monotonic() - start
        outbox.put(None)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server stopping" in raised.value.details()
    (answer,) = answers
    assert answer.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert answer.steps > 5 and len(answer.final.forces.data) > 0  # where to go on from
    assert elapsed < 10.0, f"stopping took {elapsed:.1f} s: the open Relax stream held it"


def test_relax_many_goes_on_from_the_last_state_when_its_server_stops() -> None:
    structures = ethanols(6)
    with (
        running_server({"small": small_model()}) as first,
        running_server({"small": small_model()}) as second,
    ):
        client = Client([f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"], model="small")
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                lambda: list(
                    client.relax_many(structures, fmax=1e-4, max_steps=400, trajectory_every=1)
                )
            )
            wait_for(lambda: scrape(first).get(STEPS, 0) > 60 or None, "steps on the first", 60)
            first.stop()  # answers every structure UNAVAILABLE with its last state
            first_steps = relax_steps(first)  # the server's own registry: HTTP is down
            results = sorted(running.result(timeout=120), key=lambda r: r.index)
        second_steps = relax_steps(second)
        client.close()
    assert [r.index for r in results] == list(range(len(structures)))
    assert all(r.ok for r in results), [r.error for r in results]
    # Every evaluation but the first of each structure on each server is a step; one in
    # flight when the first server stopped was evaluated but is no step (at most 6).
    evaluations = first_steps + second_steps - 2 * len(structures)
    assert 0 <= evaluations - sum(r.steps for r in results) <= len(structures)
    assert all(len(r.trajectory) == r.steps + 1 for r in results)  # joined, nothing twice
    assert second_steps > 0


def test_relax_many_starts_again_elsewhere_when_its_server_vanishes(tmp_path) -> None:
    soak = load_soak()
    model = small_model()
    checkpoint = tmp_path / "small.pt"
    save_checkpoint(model, checkpoint)
    structures = ethanols(4)
    vanishing = soak.ServerProcess.start(checkpoint)
    try:
        with running_server({"small": model}) as second:
            addresses = [f"127.0.0.1:{vanishing.port}", f"127.0.0.1:{second.port}"]
            client = Client(addresses, model="small")
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(
                    lambda: list(client.relax_many(structures, fmax=1e-4, max_steps=150))
                )
                wait_for(lambda: scrape(vanishing).get(STEPS, 0) > 40 or None, "steps", 60)
                vanishing.process.kill()  # no word to anyone: the stream just breaks
                results = sorted(running.result(timeout=120), key=lambda r: r.index)
            metrics = scrape(second)
            client.close()
    finally:
        vanishing.stop()
    assert [r.index for r in results] == list(range(len(structures)))
    assert all(r.ok for r in results), [r.error for r in results]
    # started again from the input on the second server, where every one finished
    assert all(0 < r.steps <= 150 for r in results)
    assert finished(metrics) == len(structures)
