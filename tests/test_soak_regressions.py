"""Regressions found by the soak, against a real ``crossfield serve`` subprocess (a bug of
this kind kills the process, so it must not run inside the test process).

Periodic cells with a very long lattice vector (vesin: SIGFPE, the server died) or with
periodic layers far thinner than the cutoff (the neighbour list stalled) passed
validation; now they get INVALID_ARGUMENT and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from soak_support import load_soak

from crossfield.v1 import inference_pb2_grpc

soak = load_soak()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    checkpoint, _ = soak.write_checkpoints(soak.small_model(), tmp_path_factory.mktemp("soak"))
    process = soak.ServerProcess.start(checkpoint)
    yield process
    process.stop()


def status(server, request) -> str:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    try:
        stub.Compute(request, timeout=30)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


CRASHED_BEFORE = [  # (cell diagonal, pbc) that killed or stalled the server
    ((1e6, 5.0, 5.0), (True, True, True)),
    ((2e3, 2e3, 2.0), (True, True, True)),
    ((1e4, 1e4, 1e4), (True, True, False)),
    ((1e6, 10.0, 10.0), (True, False, False)),
    ((1e300, 1e300, 1e300), (True, True, True)),
    ((1e3, 1e3, 1e-3), (True, True, True)),
]


@pytest.mark.parametrize("diagonal, pbc", CRASHED_BEFORE)
def test_hostile_cells_are_refused_and_the_server_lives(server, diagonal, pbc) -> None:
    request = soak._request([8, 1, 1], soak.WATER, np.diag(diagonal), pbc)
    assert status(server, request) == "INVALID_ARGUMENT"
    assert server.alive
    assert status(server, soak._request([8, 1, 1], soak.WATER)) == "OK"


CELL_CLASSES = ("enormous cell", "thin cell", "singular cell")


@settings(max_examples=6, deadline=None)
@given(request=st.one_of(*(soak.hostile_strategies()[name][0] for name in CELL_CLASSES)))
def test_generated_hostile_cells_are_refused(server, request) -> None:
    assert status(server, request) == "INVALID_ARGUMENT"
    assert server.alive


def test_ordinary_cells_still_work(server) -> None:
    """The new limits leave room: a 1000 A slab and a 0.5 A thin cell are served."""
    for diagonal in ((1000.0, 1000.0, 5.0), (10.0, 10.0, 0.5)):
        request = soak._request([8, 1, 1], soak.WATER, np.diag(diagonal), (True, True, True))
        assert status(server, request) == "OK"
