"""``Relax`` through a real server: the same relaxations as ASE's own optimisers in-process
(molecule, slab with an adsorbate and a fixed bottom layer, variable-cell bulk), batches
kept full by swapping structures in and out, a structure whose forces blow up failing
alone, cancellation and deadlines per structure."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE, LBFGS
from server_support import nan_for_element, running_server, scrape, small_model

from crossfield.client import Client
from crossfield.client.relax import relax_request
from crossfield.model.calculator import CrossfieldCalculator
from crossfield.model.presets import default_model
from crossfield.v1 import relax_pb2, relax_pb2_grpc

FMAX = 0.02


def ase_relax(atoms, model, head: str, optimizer: str, relax_cell: bool) -> tuple:
    """ASE's own optimiser, in this process, same model in float64: (atoms, steps)."""
    atoms = atoms.copy()
    atoms.calc = CrossfieldCalculator(model, head=head)
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    opt = {"fire": FIRE, "lbfgs": LBFGS}[optimizer](target, logfile=None)
    opt.run(fmax=FMAX, steps=500)
    return atoms, opt.nsteps


def cases() -> list[tuple]:
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.15, seed=1)
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6, "fcc")
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == 3]))
    slab.rattle(0.05, seed=2)
    copper = bulk("Cu", "fcc", a=3.75, cubic=True)  # ~4% stretched
    copper.cell = copper.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 0.98, 0.0], [0, 0, 1.0]])
    copper.rattle(0.05, seed=3)
    return [
        ("molecule", ethanol, "gfn2_xtb", "fire", False),
        ("slab", slab, "emt", "lbfgs", False),
        ("bulk", copper, "emt", "fire", True),
    ]


def test_relaxations_match_ase_in_process() -> None:
    model = default_model(torch.float64)
    with running_server({"default": model}) as server:
        client = Client(f"127.0.0.1:{server.port}")
        for name, atoms, head, optimizer, relax_cell in cases():
            before = graphs(server)
            (result,) = client.relax_many(
                [atoms], head=head, optimizer=optimizer, relax_cell=relax_cell, fmax=FMAX
            )
            reused, rebuilt = (graphs(server)[k] - before[k] for k in ("reused", "rebuilt"))
            # Each step's graph comes from the structure's Verlet list: reused while atoms
            # move little, rebuilt for every new cell. Equal to ASE all the same (below).
            assert reused + rebuilt == result.steps + 1, name
            assert (reused == 0) if relax_cell else (reused > rebuilt), (name, reused, rebuilt)
            assert result.ok and result.converged, (name, result.error)
            reference, steps = ase_relax(atoms, model, head, optimizer, relax_cell)
            # the same optimiser on the same forces takes the same steps, to round-off
            assert result.steps == steps, name
            got = result.atoms
            assert abs(result.energy - reference.get_potential_energy()) < 1e-6, name
            assert np.abs(got.positions - reference.positions).max() < 1e-5, name
            assert np.abs(got.cell.array - reference.cell.array).max() < 1e-5, name
            if name == "slab":
                fixed = atoms.constraints[0].index
                np.testing.assert_array_equal(got.positions[fixed], atoms.positions[fixed])
            if relax_cell:
                assert not np.allclose(got.cell.array, atoms.cell.array), name
        client.close()


def graphs(server) -> dict[str, float]:
    """Graphs of relaxation steps so far, by outcome (reused, rebuilt)."""
    metrics = scrape(server)
    return {
        outcome: metrics.get(
            ("crossfield_relax_graphs_total", frozenset({("outcome", outcome)})), 0
        )
        for outcome in ("reused", "rebuilt")
    }


def test_batches_stay_full_and_every_structure_is_answered_once() -> None:
    structures = []
    for index in range(14):
        atoms = molecule(["H2O", "CH4", "CH3CH2OH", "C6H6"][index % 4])
        atoms.rattle(0.1, seed=index)
        structures.append(atoms)
    with running_server({"small": small_model()}, max_atoms=40) as server:
        client = Client(f"127.0.0.1:{server.port}", model="small")
        results = list(client.relax_many(structures, fmax=0.05, max_steps=60))
        metrics = scrape(server)
        client.close()
    assert sorted(r.index for r in results) == list(range(len(structures)))
    assert all(r.ok for r in results)
    assert all(r.fmax < 0.05 for r in results if r.converged)
    assert any(r.converged for r in results)
    atoms_per_batch = metrics[("crossfield_batch_atoms_sum", frozenset({("model", "small")}))]
    batches = metrics[("crossfield_batch_atoms_count", frozenset({("model", "small")}))]
    steps = sum(r.steps + 1 for r in results)
    total_atoms = sum(len(structures[r.index]) * (r.steps + 1) for r in results)
    assert atoms_per_batch == total_atoms
    # several structures per batch: far fewer batches than force evaluations
    assert batches < steps / 2
    assert atoms_per_batch / batches > 20


def test_a_cpu_server_keeps_more_relaxations_in_flight_than_one_cpu_batch_holds() -> None:
    """On a CPU a batch holds at most 12288 edges, yet a round holds a GPU batch's worth of
    relaxations, run as several CPU batches: bounded by one CPU batch, 24 crystals of
    ~860 estimated edges would be in flight 14 at a time."""
    structures = []
    for index in range(24):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)  # 64 atoms
        atoms.rattle(0.05, seed=index)
        structures.append(atoms)
    with running_server({"small": small_model()}) as server:
        assert server.registry.resolve("small").batcher.limits.max_edges == 12288
        peak = []

        def watch() -> None:
            gauge = ("crossfield_relaxations_in_flight", frozenset())
            while not done.is_set():
                peak.append(scrape(server)[gauge])
                time.sleep(0.02)

        done = threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            client = Client(f"127.0.0.1:{server.port}", model="small")
            results = list(client.relax_many(structures, fmax=1e-6, max_steps=20))
            client.close()
        finally:
            done.set()
            watcher.join()
        metrics = scrape(server)
    assert len(results) == 24 and all(r.ok for r in results)
    assert max(peak) == 24
    batches = metrics[("crossfield_batch_structures_count", frozenset({("model", "small")}))]
    assert batches >= 2 * 21  # every round of 24 ran as two or more CPU-sized batches


def test_a_structure_whose_forces_blow_up_fails_alone() -> None:
    structures = [molecule("CH4"), molecule("SiH4"), molecule("H2O")]
    for index, atoms in enumerate(structures):
        atoms.rattle(0.1, seed=index)
    with running_server({"small": nan_for_element(small_model(), 14)}) as server:
        client = Client(f"127.0.0.1:{server.port}", model="small")
        results = sorted(
            client.relax_many(structures, fmax=1e-3, max_steps=50), key=lambda r: r.index
        )
        client.close()
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.code == "INVALID_ARGUMENT" and "non-finite" in results[1].error.details
    assert results[0].steps > 0 and results[2].steps > 0


def test_cancellation_and_deadline_per_structure() -> None:
    never = relax_pb2.RelaxSettings(fmax=1e-12, max_steps=100000)  # never converges
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=0)
    with running_server({"small": small_model()}) as server:
        client = Client(f"127.0.0.1:{server.port}", model="small")
        outbox: queue.Queue = queue.Queue()
        names = {"model": "small"}
        settings = {"fmax": 0.05, "max_steps": 200}
        long = relax_request(atoms, "long", {}, names)
        long.settings.CopyFrom(never)
        timed = relax_request(atoms, "timed", {}, {**names, "timeout": 0.5})
        timed.settings.CopyFrom(never)
        for request in (long, timed, relax_request(atoms, "short", settings, names)):
            outbox.put(request)

        def requests():
            while (request := outbox.get()) is not None:
                yield request

        stub = relax_pb2_grpc.RelaxationStub(client._servers.pick(None).channel)
        answers = {}
        for response in stub.Relax(requests(), timeout=30):
            answers[response.id] = response
            if response.id == "short":
                outbox.put(relax_pb2.RelaxRequest(id="long", cancel=True))
            if len(answers) == 3:
                outbox.put(None)
        client.close()
    assert answers["short"].status.code == 0 and answers["short"].converged
    assert answers["long"].status.code == 1  # CANCELLED, with the last state reached
    assert answers["long"].steps > 0 and answers["long"].HasField("final")
    assert answers["timed"].status.code == 4  # DEADLINE_EXCEEDED
    assert 0.4 < answers["timed"].seconds < 5 and answers["timed"].steps > 0


def test_bad_settings_are_refused_by_field() -> None:
    atoms = molecule("H2O")
    with running_server({"small": small_model()}) as server:
        client = Client(f"127.0.0.1:{server.port}", model="small")
        (result,) = client.relax_many([atoms], relax_cell=True)
        assert result.error.code == "INVALID_ARGUMENT" and "relax_cell" in result.error.details
        atoms.set_constraint(FixAtoms(indices=[0]))
        (result,) = client.relax_many([atoms], trajectory_every=1, max_steps=20)
        assert result.ok and len(result.trajectory) == result.steps + 1
        np.testing.assert_array_equal(result.atoms.positions[0], atoms.positions[0])
        client.close()


def test_relax_command_writes_in_order_reports_failures_and_resumes(tmp_path, capsys) -> None:
    import ase.io

    from crossfield.cli import main

    frames = [molecule("H2O"), molecule("CH4"), molecule("CH3CH2OH")]
    for index, atoms in enumerate(frames):
        atoms.rattle(0.1, seed=index)
    frames[1].numbers[0] = 26  # iron: not in the model's elements
    source, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(source, frames)
    with running_server({"small": small_model()}) as server:
        common = ["--server", f"127.0.0.1:{server.port}", "--model", "small", "--no-progress"]
        assert main(["relax", str(source), "--out", str(out), *common]) == 1
        written = ase.io.read(out, ":")
        assert [a.info["crossfield_status"] for a in written] == ["OK", "INVALID_ARGUMENT", "OK"]
        assert written[0].info["crossfield_converged"] and written[2].info["crossfield_fmax"] < 0.05
        assert "1 failed" in capsys.readouterr().out
        # an interrupted run: the last frame cut off, then resumed
        text = out.read_text().splitlines(keepends=True)
        out.write_text("".join(text[: len(text) - 3]))
        assert main(["relax", str(source), "--out", str(out), "--resume", *common]) == 0
        resumed = ase.io.read(out, ":")
    assert len(resumed) == 3 and resumed[2].info["crossfield_status"] == "OK"
    np.testing.assert_allclose(resumed[2].positions, written[2].positions, atol=1e-6)
