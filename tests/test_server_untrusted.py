"""Structures that once killed, wedged or blew up ``crossfield serve`` (issue 15, items 1, 3,
5 and 9), against a real server subprocess (a bug of this kind kills the process, so it
must not run inside the test process).

Before the fix: vesin died of SIGFPE on a molecule with atoms 1e15 A apart, on a slab with
one atom 1e6 A out and on big-endian bytes labelled FLOAT64 (its cell grid, shrunk to at
most 1e5 cells keeping its aspect ratio, truncated a direction to zero cells); a slab with
one atom 1e5 A above stalled the batcher for minutes (its mixed-periodicity search covers
the whole open extent from every cell); a dense 4096-atom molecule reached 10 GB; water
1e7 A from the origin got float32 positions 1 A apart and an energy off by 1.2 eV.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from soak_support import load_soak

from crossfield.v1 import inference_pb2, inference_pb2_grpc

soak = load_soak()
WATER = soak.WATER
SLAB_CELL = np.diag([20.0, 20.0, 0.0])  # open along z, as ASE writes a slab without vacuum
OPEN_SLAB = (True, True, False)
LIMIT_FLAGS = ["--max-atoms-per-structure", "4096", "--max-message-bytes", str(4 << 20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    path, _ = soak.write_checkpoints(soak.small_model(), tmp_path_factory.mktemp("untrusted"))
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    process = soak.ServerProcess.start(checkpoint, extra=LIMIT_FLAGS)
    yield process
    process.stop()


def call(server, request, timeout: float = 60.0):
    """(status name, response or None, trailing metadata as a dict)."""
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    try:
        response = stub.Compute(request, timeout=timeout)
        return "OK", response, {}
    except grpc.RpcError as err:
        return err.code().name, err, dict(err.trailing_metadata() or ())


def energy(server, numbers, positions, cell=None, pbc=None) -> float:
    status, response, _ = call(server, soak._request(numbers, positions, cell, pbc))
    assert status == "OK", response
    return response.energy


def water_with_hydrogen_at(offset) -> np.ndarray:
    """Water and a fourth atom (H) ``offset`` away: two pieces, no pair between them."""
    return np.vstack([WATER, np.asarray(offset, dtype=float)])


def assert_alive(server) -> None:
    assert server.alive, "".join(server.output[-20:])
    assert call(server, soak._request([8, 1, 1], WATER))[0] == "OK"


def test_far_apart_molecule_is_refused_and_the_server_lives(server) -> None:
    status, error, _ = call(
        server, soak._request([8, 1, 1, 1], water_with_hydrogen_at([1e15, 0, 0]))
    )
    assert status == "INVALID_ARGUMENT"
    assert "structure.positions: a coordinate of 1e+15 A is beyond the limit" in error.details()
    assert_alive(server)


@pytest.mark.parametrize("distance", [1e6, 1e7])
def test_an_atom_far_out_of_a_molecule_is_answered_as_two_pieces(server, distance) -> None:
    """Empty space costs nothing: the far atom is alone, as it would be 50 A away."""
    near = energy(server, [8, 1, 1, 1], water_with_hydrogen_at([50.0, 0, 0]))
    far = energy(server, [8, 1, 1, 1], water_with_hydrogen_at([distance, 0, 0]))
    assert far == pytest.approx(near, abs=1e-9)
    assert_alive(server)


@pytest.mark.parametrize("height", [1e5, 1e6, 1e7])
def test_an_atom_far_above_a_slab_is_answered_at_once(server, height) -> None:
    """1e5 A stalled the batcher for minutes; 1e6 A and beyond killed the server."""
    numbers = [8, 1, 1, 1]
    near = energy(server, numbers, water_with_hydrogen_at([1, 2, 50.0]), SLAB_CELL, OPEN_SLAB)
    start = time.monotonic()
    far = energy(server, numbers, water_with_hydrogen_at([1, 2, height]), SLAB_CELL, OPEN_SLAB)
    assert time.monotonic() - start < 20.0
    assert far == pytest.approx(near, abs=1e-9)
    assert_alive(server)


@pytest.mark.parametrize("dtype", [">f8", ">f4"])
def test_big_endian_bytes_are_refused(server, dtype) -> None:
    """Byte-swapped water decodes to coordinates like 2.4e19 A: refused, naming the field."""
    request = soak._request([8, 1, 1], WATER)
    wire = inference_pb2.DTYPE_FLOAT64 if dtype == ">f8" else inference_pb2.DTYPE_FLOAT32
    request.structure.positions.CopyFrom(
        inference_pb2.Array(dtype=wire, shape=[3, 3], data=WATER.astype(dtype).tobytes())
    )
    status, error, _ = call(server, request)
    assert status == "INVALID_ARGUMENT"
    assert "structure.positions" in error.details() and "little-endian" in error.details()
    assert_alive(server)


def peak_rss_mib(server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_dense_molecule_is_refused_before_it_costs_memory(server) -> None:
    """4096 atoms at 10x the density of liquid water (~1 atom per A^3): 10.8 GB before."""
    side = 4096 ** (1 / 3)
    positions = np.random.default_rng(0).uniform(0.0, side, (4096, 3))
    status, error, _ = call(server, soak._request(np.full(4096, 1), positions))
    assert status == "INVALID_ARGUMENT", error
    assert "structure" in error.details()
    assert peak_rss_mib(server) < 2048
    assert_alive(server)


def test_dense_periodic_cell_is_refused_before_it_costs_memory(server) -> None:
    """Below the 1000 neighbours-per-atom guard (that let a cell reach 8.75 GB through) and
    the edge limit: 4096 atoms at ~120 neighbours each, 0.5 M edges, ~4 GiB for this model.
    Its neighbour list is built (in a worker: it is not small) and its exact edges refused."""
    density = 120.0 / (4.0 / 3.0 * np.pi * 4.0**3)
    side = (4096 / density) ** (1 / 3)
    positions = np.random.default_rng(1).uniform(0.0, side, (4096, 3))
    request = soak._request(np.full(4096, 1), positions, np.eye(3) * side, (True, True, True))
    status, error, _ = call(server, request)
    assert status == "INVALID_ARGUMENT", error
    assert "GiB to evaluate, beyond the limit of 2 GiB" in error.details(), error.details()
    assert peak_rss_mib(server) < 2048
    assert_alive(server)


@pytest.fixture(scope="module")
def float32_server(checkpoint):
    process = soak.ServerProcess.start(checkpoint, extra=[*LIMIT_FLAGS, "--dtype", "float32"])
    yield process
    process.stop()


def test_translated_structures_get_the_answer_they_get_at_the_origin(float32_server) -> None:
    """Positions are centred (molecules) or wrapped (crystals) in float64 before the model
    casts them to float32: 1e7 A away is the same structure."""
    crystal = soak.structure_pool(8, seed=0)[5]  # 8-atom silicon, periodic
    cases = [
        ([8, 1, 1], WATER, None, None),
        (crystal.numbers, crystal.positions, crystal.cell.array, (True, True, True)),
    ]
    for numbers, positions, cell, pbc in cases:
        answers = []
        for offset in (0.0, 1e7):
            request = soak._request(numbers, positions + offset, cell, pbc)
            status, response, _ = call(float32_server, request)
            assert status == "OK", response
            forces = np.frombuffer(response.forces.data, "<f8").reshape(-1, 3)
            answers.append((response.energy, forces))
        (e0, f0), (e1, f1) = answers
        assert abs(e1 - e0) < 1e-4, (e0, e1)
        assert np.abs(f1 - f0).max() < 1e-3 * max(1.0, np.abs(f0).max())


# -- isolation: graph building in worker processes ------------------------------------------
ISOLATED_FLAGS = ["--graph-in-process-pairs", "0", "--graph-timeout", "3", "--max-delay-ms", "300"]


@pytest.fixture(scope="module")
def isolated_server(checkpoint):
    """Every structure's graph is built in a worker process (none is small enough)."""
    process = soak.ServerProcess.start(checkpoint, extra=[*LIMIT_FLAGS, *ISOLATED_FLAGS])
    yield process
    process.stop()


def graph_workers(server) -> list[int]:
    """Process ids of the server's graph workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == server.process.pid and b"crossfield.server.graph_worker" in command:
            found.append(int(stat.parent.name))
    return found


def one_worker(server) -> int:
    """The single graph worker, started by a first structure if need be."""
    assert call(server, soak._request([8, 1, 1], WATER))[0] == "OK"
    workers = graph_workers(server)
    assert len(workers) == 1, workers
    return workers[0]


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (R, S, T, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for_request_in_pipe(pid: int) -> None:
    """Until the server has written a request to the (stopped) worker's stdin."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        deadline = time.monotonic() + 30
        while int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little") == 0:
            assert time.monotonic() < deadline, "the server never sent the worker a structure"
            time.sleep(0.01)
    finally:
        os.close(fd)


def test_structures_built_in_workers_get_the_same_answers(server, isolated_server) -> None:
    for atoms in soak.structure_pool(8, seed=1)[::2]:
        periodic = atoms.pbc.any()
        cell, pbc = (atoms.cell.array, tuple(atoms.pbc)) if periodic else (None, None)
        request = soak._request(atoms.numbers, atoms.positions, cell, pbc)
        (status, expected, _), (isolated_status, got, _) = (
            call(server, request),
            call(isolated_server, request),
        )
        assert status == isolated_status == "OK"
        assert got.energy == pytest.approx(expected.energy, rel=1e-12)


def test_a_stalled_graph_worker_costs_one_structure(isolated_server) -> None:
    """The structure whose worker stalls is refused as poison after the time limit; its
    batch-mates (same stream, same batch) are answered by a fresh worker."""
    worker = one_worker(isolated_server)
    os.kill(worker, signal.SIGSTOP)
    requests = [soak._request([8, 1, 1], WATER + 0.01 * i, id=str(i)) for i in range(3)]
    stub = inference_pb2_grpc.InferenceStub(
        grpc.insecure_channel(f"127.0.0.1:{isolated_server.port}")
    )
    responses = list(stub.ComputeStream(iter(requests), timeout=60))
    assert len(responses) == 3
    refused = [r for r in responses if r.status.code != 0]
    assert len(refused) == 1, responses
    assert refused[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "graph building took longer than 3 s" in refused[0].status.message
    assert all(r.HasField("energy") for r in responses if r.status.code == 0)
    assert not Path(f"/proc/{worker}").exists()  # killed, not left stopped
    assert_alive(isolated_server)


def test_a_crashed_graph_worker_marks_the_structure_as_poison(isolated_server) -> None:
    """A worker dying of SIGFPE with a structure (what vesin did to the server) refuses
    that structure with trailing metadata ``crossfield-poison``; the server lives on."""
    worker = one_worker(isolated_server)
    os.kill(worker, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, isolated_server, soak._request([8, 1, 1], WATER))
        wait_for_request_in_pipe(worker)
        os.kill(worker, signal.SIGFPE)  # delivered when it continues, with the request read
        os.kill(worker, signal.SIGCONT)
        status, error, metadata = answer.result()
    assert status == "INVALID_ARGUMENT"
    assert "crashed its worker process (it died of SIGFPE)" in error.details()
    assert "SIGFPE" in metadata["crossfield-poison"]
    assert_alive(isolated_server)


def test_a_worker_killed_while_idle_is_replaced_without_blame(isolated_server) -> None:
    worker = one_worker(isolated_server)
    os.kill(worker, signal.SIGKILL)  # the server finds out when it next needs the worker
    # Dead before the structure arrives (SIGKILL takes effect asynchronously, and an idle
    # device hands the structure to a worker within a millisecond).
    # Its main thread turns zombie before its other threads (vesin's pool) have exited and
    # closed the pipes: wait until it is the only thread left, or a structure written in
    # between finds a live pipe and is blamed (CI saw it once).
    deadline = time.monotonic() + 30
    tasks = Path(f"/proc/{worker}/task")
    while len(list(tasks.iterdir())) > 1 or process_state(worker) != "Z":
        assert time.monotonic() < deadline, "the killed worker did not die"
        time.sleep(0.01)
    assert call(isolated_server, soak._request([8, 1, 1], WATER))[0] == "OK"
    assert graph_workers(isolated_server) not in ([], [worker])


@settings(max_examples=6, deadline=None)
@given(request=soak.hostile_strategies()["far coordinates"][0])
def test_generated_far_coordinates_are_refused(server, request) -> None:
    """The soak's class of these attacks (big-endian bytes, coordinates past 1e8 A)."""
    assert call(server, request)[0] == "INVALID_ARGUMENT"
    assert server.alive
