"""Neighbour lists on the model's device (``model/device_graph.py``), checked on the CPU
with the same library (vesin-torch runs vesin's CPU code there): the same edges as the
host path, exactly, for every kind of structure, and the same float64 results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backends_support import ELEMENTS, HEADS, tiny_model
from device_graph_support import assert_same_batch, device_pool
from server_support import assert_close, request_for, running_server, small_model, structures, stub

from crossfield.model import Structure, build_batch, evaluate
from crossfield.model.device_graph import (
    build_batch_on_device,
    device_buildable,
    molecule_lattice,
)
from crossfield.model.neighbours import canonical_frame
from crossfield.server.graph_cost import GraphLimits
from crossfield.server.validation import check_request
from crossfield.v1.arrays import from_array

R_MAX = 4.0


def test_same_edges_as_the_host_path_for_every_kind_of_structure():
    pool = device_pool()
    frames = [canonical_frame(s.positions, s.cell, s.pbc, R_MAX) for s in pool]
    on_device = [device_buildable(f, R_MAX) for f in frames]
    assert any(on_device) and not all(on_device)  # both paths meet in one batch
    host = build_batch(pool, ELEMENTS, R_MAX, HEADS)
    device = build_batch_on_device(pool, ELEMENTS, R_MAX, HEADS, torch.float64, "cpu")
    assert_same_batch(device, host)


def test_many_molecules_in_one_call_keep_their_own_pairs():
    rng = np.random.default_rng(7)
    molecules = []
    for index in range(30):  # a 4 x 4 x 4 lattice, partly filled
        count = int(rng.integers(1, 12))
        positions = rng.uniform(-3.0, 3.0, (count, 3))
        numbers = rng.choice(ELEMENTS, count)
        molecules.append(Structure(numbers, positions, head=HEADS[index % 3]))
    host = build_batch(molecules, ELEMENTS, R_MAX, HEADS)
    device = build_batch_on_device(molecules, ELEMENTS, R_MAX, HEADS, torch.float64, "cpu")
    assert_same_batch(device, host)


def test_float64_results_equal_the_host_batch():
    model = tiny_model()
    pool = device_pool()
    host = model(build_batch(pool, ELEMENTS, R_MAX, HEADS), compute_stress=True)
    device = model(
        build_batch_on_device(pool, ELEMENTS, R_MAX, HEADS, torch.float64, "cpu"),
        compute_stress=True,
    )
    for name in ("energy", "forces", "stress"):  # only the order of edge sums differs
        torch.testing.assert_close(device[name], host[name], rtol=1e-12, atol=1e-12)


def test_lattice_keeps_molecules_further_apart_than_the_cutoff():
    pool = [s for s in device_pool() if not any(s.pbc)]
    frames = [canonical_frame(s.positions, s.cell, s.pbc, R_MAX) for s in pool]
    sites, side = molecule_lattice(frames, R_MAX)
    placed = [f.positions + site for f, site in zip(frames, sites)]
    box = np.eye(3) * side
    for a in range(len(placed)):
        for b in range(len(placed)):
            for image in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3), -1).reshape(-1, 3):
                if a == b and not image.any():
                    continue
                gap = placed[b][None] + image @ box - placed[a][:, None]
                assert np.linalg.norm(gap, axis=-1).min() > R_MAX


@pytest.mark.parametrize(
    ("case", "expected"),
    [("molecule", True), ("large cell", True), ("small cell", False), ("dense bound", False)],
)
def test_device_buildable_only_where_vesin_cuda_is_exact(case, expected):
    if case in ("molecule", "dense bound"):
        frame = canonical_frame(np.eye(3), None, (False,) * 3, R_MAX)
    else:
        side = 8.0 if case == "large cell" else 7.9  # faces >= 2 r_max: one image suffices
        frame = canonical_frame(np.eye(3), np.eye(3) * side, (True,) * 3, R_MAX)
    bound = 3 * 513 if case == "dense bound" else None  # beyond vesin's 512 pairs per atom
    assert device_buildable(frame, R_MAX, bound) is expected


def test_server_finds_pairs_on_the_device_after_its_checks():
    """A real server with --device-graphs on (the CPU stands in for the device): the
    structures vesin-torch handles exactly are built on it, the rest on the host, in one
    stream; every answer equals in-process evaluation."""
    model = small_model()
    work = structures(16, seed=5)
    requests = [request_for(s, id=str(i)) for i, s in enumerate(work)]
    limits = GraphLimits(device_graphs="on")
    with running_server({"small": model}, graphs=limits, max_delay=0.5) as server:
        served = server.registry.resolve("small")
        routes = [
            server.runner.graphs.on_device(served.model, check_request(served, r, s.head))
            for r, s in zip(requests, work)
        ]
        responses = {r.id: r for r in stub(server).ComputeStream(iter(requests), timeout=60)}
    assert any(routes) and not all(routes)  # the 8-atom Si cell is thinner than 2 r_max
    expected = evaluate(model, work)
    for index, want in enumerate(expected):
        got = responses[str(index)]
        assert_close(got.energy, want["energy"], f"energy {index}")
        assert_close(from_array(got.forces), want["forces"], f"forces {index}")
