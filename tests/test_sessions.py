"""MD sessions (ComputeSession) against real servers on loopback: a long trajectory whose
neighbour list is kept with a Verlet skin equals fresh evaluations step by step (float64,
atoms crossing the cutoff); sessions batch together; every new position set is checked
(far-flung atoms refused, the session goes on); a server that stops ends its sessions
with a status that makes RemoteCalculator resume elsewhere; and RemoteCalculator falls
back to Compute on a server without sessions."""

from __future__ import annotations

import asyncio
import copy
import queue
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.md.verlet import VelocityVerlet
from hotload_support import wait_for
from model_process_support import ThreadNamingMACE, thread_naming
from server_support import (
    request_for,
    runner_held,
    running_server,
    scrape,
    small_model,
    wait_queued,
)

from crossfield.client import RemoteCalculator
from crossfield.model import Structure, evaluate, neighbour_list
from crossfield.server import inline
from crossfield.server.streams import StreamLimits
from crossfield.server.wire import decoder
from crossfield.v1 import inference_pb2, inference_pb2_grpc
from crossfield.v1.arrays import to_array

R_MAX = 4.0  # small_model's cutoff


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return small_model(seed=11)


def graphs(server) -> dict[str, float]:
    """Session step graphs so far, by outcome (reused, rebuilt)."""
    return {
        dict(labels)["outcome"]: value
        for (name, labels), value in scrape(server).items()
        if name == "crossfield_session_graphs_total"
    }


def hot_silicon() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.1, seed=3)
    atoms.set_momenta(np.random.default_rng(3).normal(scale=1.2, size=(len(atoms), 3)))
    return atoms


def hot_cluster() -> Atoms:
    atoms = molecule("CH3CH2OH") + molecule("H2O")
    atoms.positions[-3:] += [3.0, 0.5, 0.0]
    atoms.set_momenta(np.random.default_rng(4).normal(scale=0.15, size=(len(atoms), 3)))
    return atoms


def pairs(atoms: Atoms) -> set[tuple[int, int, tuple[int, ...]]]:
    sender, receiver, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, R_MAX)
    return {(int(s), int(r), tuple(map(int, k))) for s, r, k in zip(sender, receiver, shifts)}


@pytest.mark.parametrize(
    "make, femtoseconds", [(hot_silicon, 2.0), (hot_cluster, 1.0)], ids=["crystal", "molecules"]
)
def test_a_long_session_trajectory_equals_fresh_evaluations(model, make, femtoseconds) -> None:
    """300 hot MD steps through a session: every step's energy, forces (and stress) equal
    a fresh in-process evaluation, while the kept neighbour list was reused on most steps,
    and pairs entered or left the cutoff at many steps that reused it. (Hot hydrogens move
    about 0.03 A per femtosecond: 1 fs steps, as MD with hydrogens takes.)"""
    atoms = make()
    periodic = atoms.pbc.any()
    with running_server({"small": model}) as server:
        calculator = RemoteCalculator(f"127.0.0.1:{server.port}", model="small", head="pbe")
        atoms.calc = calculator
        dynamics = VelocityVerlet(atoms, femtoseconds * units.fs)
        worst = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
        crossed, previous, rebuilt = 0, pairs(atoms), 0.0

        def compare() -> None:
            nonlocal crossed, previous, rebuilt
            fresh = evaluate(model, [Structure.from_atoms(atoms, head="pbe")], periodic)[0]
            got = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
            if periodic:
                got["stress"] = atoms.get_stress(voigt=False)
            for name, value in got.items():
                scale = max(1.0, float(np.abs(fresh[name]).max()))
                worst[name] = max(worst[name], float(np.abs(value - fresh[name]).max()) / scale)
            now, rebuilt_now = pairs(atoms), graphs(server).get("rebuilt", 0.0)
            crossed += now != previous and rebuilt_now == rebuilt  # with the kept list
            previous, rebuilt = now, rebuilt_now

        dynamics.attach(compare)
        dynamics.run(300)
        counted = graphs(server)
        assert calculator.uses_session
        calculator.close()
    assert max(worst.values()) < 1e-11, worst
    assert counted["reused"] > 4 * counted["rebuilt"], counted
    assert crossed >= 20, (crossed, counted)


def session_stub(server) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


class RawSession:
    """A ComputeSession call driven message by message."""

    def __init__(self, server) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = session_stub(server).ComputeSession(iter(self._requests.get, None), timeout=60)

    def send(self, **kind) -> inference_pb2.ComputeResponse:
        self._requests.put(inference_pb2.SessionRequest(**kind))
        return next(self.call)

    def step(self, positions, id: str = "", **fields) -> inference_pb2.ComputeResponse:
        step = inference_pb2.SessionStep(id=id, positions=to_array(positions, "float64"), **fields)
        return self.send(step=step)

    def close(self) -> None:
        self._requests.put(None)


def water_pair() -> Structure:
    atoms = molecule("H2O") + molecule("H2O")
    atoms.positions[3:] += [2.8, 0.0, 0.0]
    return Structure.from_atoms(atoms, head="pbe")


def fresh_energy(model, structure: Structure, positions) -> float:
    moved = Structure(structure.numbers, np.asarray(positions), head=structure.head)
    return float(evaluate(model, [moved])[0]["energy"])


INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_every_step_is_checked_and_a_refused_step_leaves_the_session_going(model) -> None:
    structure = water_pair()
    with running_server({"small": model}) as server:
        session = RawSession(server)
        early = session.step(structure.positions, id="early")
        assert early.status.code == INVALID and "first message must be start" in (
            early.status.message
        )
        start = session.send(start=request_for(structure, id="s"))
        assert start.id == "s" and start.status.code == 0
        positions = structure.positions.copy()
        assert session.step(positions[:5], id="short").status.message.startswith(
            "step.positions: shape [5, 3] does not match [6, 3]"
        )
        far = positions.copy()
        far[4] = [3e9, 0.0, 0.0]  # beyond --max-coordinate
        refused = session.step(far, id="far")
        assert refused.status.code == INVALID
        assert refused.status.message.startswith("step.positions: a coordinate of 3e+09 A")
        flung = positions.copy()
        flung[4] += [1e6, 0.0, 0.0]  # a hydrogen flung off: answered as the isolated atom
        answer = session.step(flung, id="flung")
        assert answer.status.code == 0
        assert answer.energy == pytest.approx(fresh_energy(model, structure, flung), rel=1e-12)
        collapsed = session.step(np.zeros_like(positions), id="collapsed")
        assert collapsed.status.code == INVALID  # every atom on one spot
        back = session.step(positions + 0.01, id="back")  # the session goes on
        assert back.id == "back" and back.status.code == 0
        assert back.energy == pytest.approx(
            fresh_energy(model, structure, positions + 0.01), rel=1e-12
        )
        session.close()
        assert list(session.call) == []


def test_an_idle_session_is_ended_and_the_calculator_opens_a_new_one(model) -> None:
    """A session silent for the server's idle timeout ends UNAVAILABLE, freeing what it
    held; RemoteCalculator's next step opens a new session and gets the right answer."""
    atoms = hot_cluster()
    limits = StreamLimits(idle_timeout=0.5)
    with running_server({"small": model}, settings={"streams": limits}) as server:
        session = RawSession(server)
        assert session.send(start=request_for(water_pair())).status.code == 0
        atoms.calc = RemoteCalculator(f"127.0.0.1:{server.port}", model="small", head="pbe")
        atoms.get_forces()
        with pytest.raises(grpc.RpcError) as raised:
            next(session.call)  # nothing sent: the server ends the session
        idle = ("crossfield_streams_ended_total", frozenset({("reason", "idle")}))
        wait_for(lambda: scrape(server).get(idle) == 2 or None, "both sessions idle", 10)
        atoms.positions[0] += 0.05
        forces = atoms.get_forces()  # its session ended too; reopened
        counted = graphs(server)
        atoms.calc.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "session idle" in raised.value.details()
    fresh = evaluate(model, [Structure.from_atoms(atoms, head="pbe")])[0]
    np.testing.assert_allclose(forces, fresh["forces"], rtol=1e-10, atol=1e-12)
    assert counted == {"rebuilt": 3.0}  # two starts, and the calculator's new start


def test_sessions_batch_together(model) -> None:
    structure = water_pair()
    with running_server({"small": model}) as server:
        sessions = [RawSession(server) for _ in range(3)]
        for session in sessions:
            session.send(start=request_for(structure))
        batches = ("crossfield_batch_structures_count", frozenset({("model", "small")}))
        before = scrape(server)[batches]
        with runner_held(server):
            for index, session in enumerate(sessions):
                step = inference_pb2.SessionStep(
                    id=str(index), positions=to_array(structure.positions + 0.01 * index)
                )
                session._requests.put(inference_pb2.SessionRequest(step=step))
            wait_queued(server, 3)
        answers = [next(session.call) for session in sessions]
        metrics = scrape(server)
        for session in sessions:
            session.close()
    assert metrics[batches] == before + 1  # the three steps in one batch
    for index, answer in enumerate(answers):
        expected = fresh_energy(model, structure, structure.positions + 0.01 * index)
        assert answer.id == str(index) and answer.energy == pytest.approx(expected, rel=1e-12)


def test_a_step_may_change_the_cell_and_ask_for_stress(model) -> None:
    """NPT-like steps: a new cell rebuilds the list; stress asked for by a step comes back
    and equals a fresh evaluation."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=8)
    structure = Structure.from_atoms(atoms, head="pbe")
    with running_server({"small": model}) as server:
        session = RawSession(server)
        session.send(start=request_for(structure))
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array * 1.02, scale_atoms=True)
        answer = session.step(
            strained.positions,
            cell=to_array(strained.cell.array, "float64"),
            properties=[inference_pb2.PROPERTY_ENERGY, inference_pb2.PROPERTY_STRESS],
        )
        counted = graphs(server)
        # a refused step's cell is not kept: the next step without one has the last good cell
        refused = session.step(
            np.zeros_like(strained.positions), cell=to_array(atoms.cell.array * 1.05, "float64")
        )
        again = session.step(strained.positions)
        session.close()
    fresh = evaluate(model, [Structure.from_atoms(strained, head="pbe")], compute_stress=True)[0]
    assert answer.energy == pytest.approx(float(fresh["energy"]), rel=1e-12)
    stress = np.frombuffer(answer.stress.data).reshape(3, 3)
    np.testing.assert_allclose(stress, fresh["stress"], rtol=1e-10, atol=1e-12)
    assert counted == {"rebuilt": 2.0}
    assert refused.status.code == INVALID
    assert again.status.code == 0 and again.energy == pytest.approx(answer.energy, rel=1e-12)


def test_a_stopping_server_ends_its_sessions_and_the_calculator_resumes_elsewhere(model) -> None:
    atoms = hot_cluster()
    with running_server({"small": model}) as first, running_server({"small": model}) as second:
        session = RawSession(first)
        session.send(start=request_for(water_pair()))
        calculator = RemoteCalculator(
            [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"], model="small", head="pbe"
        )
        atoms.calc = calculator
        dynamics = VelocityVerlet(atoms, 1.0 * units.fs)
        dynamics.run(3)
        assert calculator.last_result is not None
        on_first = graphs(first)
        first.stop(grace=1.0)
        with pytest.raises(grpc.RpcError) as raised:
            session.step(water_pair().positions)
        dynamics.run(3)  # resumed on the other server from the last structure
        fresh = evaluate(model, [Structure.from_atoms(atoms, head="pbe")])[0]
        np.testing.assert_allclose(atoms.get_forces(), fresh["forces"], rtol=1e-10, atol=1e-12)
        on_second = graphs(second)
        calculator.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "resume the session on another server" in raised.value.details()
    assert sum(on_first.values()) >= 4 and sum(on_second.values()) >= 3


@contextmanager
def without_sessions(server) -> Iterator[int]:
    """A second gRPC server on ``server``'s loop, answering with its Inference service
    as the previous release did: every RPC but ComputeSession (which is UNIMPLEMENTED).
    Yields its port; stopped on leaving (a server left running hangs the loop's end)."""
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    handlers = {}
    for method in service.methods:
        if method.name == "ComputeSession":
            continue
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        request_class = getattr(inference_pb2, method.input_type.name)
        handlers[method.name] = make(
            getattr(server._service, method.name),
            request_deserializer=decoder(request_class),
            response_serializer=lambda message: message.SerializeToString(),
        )
    old = None

    async def start() -> int:
        nonlocal old
        old = grpc.aio.server()
        old.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        port = old.add_insecure_port("127.0.0.1:0")
        await old.start()
        return port

    loop = server._io.loop
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        if old is not None:
            asyncio.run_coroutine_threadsafe(old.stop(None), loop).result(30)


def test_the_calculator_falls_back_to_compute_on_a_server_without_sessions(model) -> None:
    atoms = hot_silicon()
    with running_server({"small": model}) as server, without_sessions(server) as port:
        calculator = RemoteCalculator(f"127.0.0.1:{port}", model="small")
        atoms.calc = calculator
        VelocityVerlet(atoms, 1.0 * units.fs).run(5)
        fresh = evaluate(model, [Structure.from_atoms(atoms)])[0]
        np.testing.assert_allclose(atoms.get_forces(), fresh["forces"], rtol=1e-10, atol=1e-12)
        assert not calculator.uses_session
        assert graphs(server) == {}
        ok = sum(
            value
            for (name, labels), value in scrape(server).items()
            if name == "crossfield_requests_total" and ("status", "OK") in labels
        )
        calculator.close()
    assert ok == 6  # the initial evaluation and 5 steps, all through Compute


def open_streams(server) -> float:
    return scrape(server)[("crossfield_open_streams", frozenset())]


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_a_lone_session_runs_on_the_io_loop_and_a_crowd_goes_to_the_runner(
    model, model_process: bool
) -> None:
    """The shortcut of ``inline.py``: alone on the server, a session's steps are evaluated
    on the I/O loop's thread (no hand-off to the runner and back); with another call open
    (a second session, a ComputeStream), every step takes the runner, where it can batch.
    With a model process, the lone steps of an eager model still run on the loop, with
    this process's copy of the model, and the crowd's in the child (not seen here). The
    answers are the same either way."""
    naming = thread_naming(copy.deepcopy(model))
    structure = water_pair()
    settings = {"model_process": model_process}
    with running_server({"small": naming}, settings=settings) as server:
        lone = RawSession(server)
        lone.send(start=request_for(structure))
        ThreadNamingMACE.seen.clear()
        alone = [lone.step(structure.positions + 0.01 * k).energy for k in range(1, 4)]
        threads_alone = list(ThreadNamingMACE.seen)

        other = RawSession(server)
        other.send(start=request_for(structure))
        ThreadNamingMACE.seen.clear()
        crowded = [lone.step(structure.positions + 0.01 * k).energy for k in range(1, 4)]
        threads_crowded = list(ThreadNamingMACE.seen)
        other.close()
        wait_for(lambda: open_streams(server) == 1, "the second session to end")

        idle: queue.SimpleQueue = queue.SimpleQueue()
        stream = session_stub(server).ComputeStream(iter(idle.get, None), timeout=60)
        wait_for(lambda: open_streams(server) == 2, "the stream to open")
        ThreadNamingMACE.seen.clear()
        beside_a_stream = lone.step(structure.positions + 0.05).energy
        threads_beside_a_stream = list(ThreadNamingMACE.seen)
        lone.close()
        idle.put(None)
        list(stream)
    assert threads_alone == ["grpc-io"] * 3  # server/loop.py's thread
    runner = [] if model_process else ["runner-cpu"]
    assert threads_crowded == runner * 3
    assert threads_beside_a_stream == runner
    for k, (a, b) in enumerate(zip(alone, crowded), start=1):
        expected = fresh_energy(model, structure, structure.positions + 0.01 * k)
        assert a == pytest.approx(expected, rel=1e-12) and b == pytest.approx(expected, rel=1e-12)
    assert beside_a_stream == pytest.approx(
        fresh_energy(model, structure, structure.positions + 0.05), rel=1e-12
    )


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_a_lone_step_too_long_for_the_io_loop_runs_on_the_runner_with_the_servers_model(
    model, model_process: bool, monkeypatch
) -> None:
    """A lone session whose structure is beyond ``inline.HERE_MAX_EDGES`` (lowered here,
    so that a water pair is) leaves the I/O loop alone: its steps take the runner's
    thread, but, as on the loop, with this process's copy of an eager model, even with a
    model process (whose hop cost 64-atom steps 8-10 ms), and the same answers."""
    monkeypatch.setattr(inline, "HERE_MAX_EDGES", 1)
    naming = thread_naming(copy.deepcopy(model))
    structure = water_pair()
    with running_server({"small": naming}, settings={"model_process": model_process}) as server:
        lone = RawSession(server)
        lone.send(start=request_for(structure))
        ThreadNamingMACE.seen.clear()
        energies = [lone.step(structure.positions + 0.01 * k).energy for k in range(1, 4)]
        threads = list(ThreadNamingMACE.seen)
        lone.close()
    assert threads == ["runner-cpu"] * 3
    for k, energy in enumerate(energies, start=1):
        expected = fresh_energy(model, structure, structure.positions + 0.01 * k)
        assert energy == pytest.approx(expected, rel=1e-12)
