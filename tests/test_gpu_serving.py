"""GPU checks of the server (``pytest -m gpu``; see conftest.py): graphs built on the device
through the server's bounds, and a batch too large for the device's memory split and
retried with no request lost, with device memory reported as allocated and reserved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from server_support import assert_close, request_for, running_server, scrape, small_model, stub
from server_support import structures as mixed_structures

from crossfield.model import HeadConfig, ModelConfig, Structure, build_model, evaluate
from crossfield.server.graph_cost import GIB, GraphLimits, bytes_per_edge
from crossfield.server.validation import check_request
from crossfield.v1.arrays import from_array

pytestmark = pytest.mark.gpu


def test_server_on_cuda_finds_pairs_on_the_device():
    model = small_model()
    work = mixed_structures(16, seed=3)
    requests = [request_for(s, id=str(i)) for i, s in enumerate(work)]
    with running_server({"small": model}, settings={"device": "cuda"}, max_delay=0.2) as server:
        served = server.registry.resolve("small")
        routes = [
            server.runner.graphs.on_device(served.model, check_request(served, r, s.head))
            for r, s in zip(requests, work)
        ]
        answers = {a.id: a for a in stub(server).ComputeStream(iter(requests), timeout=120)}
    assert any(routes)
    for index, want in enumerate(evaluate(model, work)):
        assert_close(answers[str(index)].energy, want["energy"], f"energy {index}")
        assert_close(from_array(answers[str(index)].forces), want["forces"], f"forces {index}")


def wide_model() -> torch.nn.Module:
    """MP-0-medium-sized (128x0e+128x1o, L=3, correlation 3): hungry for memory per edge."""
    config = ModelConfig(
        elements=[29],
        heads=[HeadConfig("pbe", e0s=[-3.0])],
        hidden_irreps="128x0e+128x1o",
        max_ell=3,
        correlation=3,
        r_max=5.0,
        avg_num_neighbors=40.0,
    )
    return build_model(config, seed=0).to(torch.float32).eval()


def test_out_of_memory_batch_is_split_and_retried_with_no_request_lost():
    model = wide_model().cuda()
    total = torch.cuda.mem_get_info()[1]
    per_edge = bytes_per_edge(model)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True)
    edges_per_cell = 4 * 42  # fcc Cu within 5 A: 12 + 6 + 24 neighbours per atom
    cells = int(0.3 * total / per_edge / edges_per_cell)  # each structure: 30 % of the device
    side = max(2, round(cells ** (1 / 3)))
    crystals = []
    for seed in range(8):  # together 2.4x the device: halves (1.2x) fail too, quarters fit
        atoms = copper * (side, side, side)
        atoms.rattle(0.02, seed=seed)
        crystals.append(Structure.from_atoms(atoms, head="pbe"))
    atoms_each = len(crystals[0].numbers)
    limits = GraphLimits(max_edges=1 << 24, max_memory=total)
    requests = [request_for(s, model="wide", id=str(i)) for i, s in enumerate(crystals)]
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    with running_server(
        {"wide": model.cpu()},
        dtype=torch.float32,
        settings={"device": "cuda"},
        graphs=limits,
        max_atoms=8 * atoms_each,
        max_edges=1 << 28,
        max_delay=5.0,
        max_atoms_per_structure=atoms_each,
    ) as server:
        answers = {a.id: a for a in stub(server).ComputeStream(iter(requests), timeout=600)}
        metrics = scrape(server)
    assert torch.cuda.memory_stats()["num_ooms"] > ooms  # the whole batch did not fit
    assert sorted(answers) == [str(i) for i in range(8)]  # and every structure was answered
    assert all(a.status.code == 0 for a in answers.values()), [a.status for a in answers.values()]
    single = evaluate(model.cuda(), crystals[:1])[0]
    assert_close(answers["0"].energy, single["energy"], "energy", rtol=1e-4)
    memory = {
        dict(labels)["kind"]: value
        for (name, labels), value in metrics.items()
        if name == "crossfield_device_memory_bytes"
    }
    assert memory["allocated"] > 0 and memory["reserved"] >= memory["allocated"]
    assert memory["reserved"] < total + GIB
    assert np.isfinite([a.energy for a in answers.values()]).all()
