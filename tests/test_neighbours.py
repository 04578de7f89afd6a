"""The neighbour list behind every graph (``model/neighbours.py``): exact against brute
force wherever atoms are, and unable to crash or stall on finite input.

Cases that crashed vesin run in a subprocess: a regression would kill the test process."""

from __future__ import annotations

import math
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import HEADS, small_model

from crossfield.model import Structure, evaluate, neighbour_list
from crossfield.model import neighbours as neighbours_module
from crossfield.model.neighbours import NeighbourListError, plan_grid


def distances(positions, cell, pbc, sender, receiver, shifts) -> dict:
    """(sender, receiver) -> sorted distances of its edges."""
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(positions[receiver] - positions[sender] + shifts @ cell, axis=1)
    table: dict[tuple[int, int], list[float]] = {}
    for i, j, length in zip(sender.tolist(), receiver.tolist(), lengths.tolist()):
        table.setdefault((i, j), []).append(length)
    return {key: sorted(values) for key, values in table.items()}


def brute_force(positions, cell, pbc, r_max) -> dict:
    """The same table by trying every image in reach of atoms wrapped into the cell."""
    pbc = np.asarray(pbc)
    cell = np.asarray(cell, dtype=float)
    wrapped = positions.copy()
    ranges = []
    for axis in range(3):
        if not pbc[axis]:
            ranges.append([0])
            continue
        fractional = np.linalg.solve(cell.T, wrapped.T).T
        wrapped -= np.outer(np.floor(fractional[:, axis]), cell[axis])
        others = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
        reach = math.ceil(r_max * np.linalg.norm(others) / abs(cell[axis] @ others)) + 2
        ranges.append(range(-reach, reach + 1))
    sender, receiver, shifts = [], [], []
    for shift in np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T:
        vectors = wrapped[None, :, :] - wrapped[:, None, :] + shift @ cell
        close = np.linalg.norm(vectors, axis=-1) < r_max
        if not shift.any():
            np.fill_diagonal(close, False)
        i, j = np.nonzero(close)
        sender += i.tolist()
        receiver += j.tolist()
        shifts += [shift] * len(i)
    shifts = np.array(shifts, dtype=float).reshape(-1, 3)
    return distances(wrapped, cell, pbc, np.array(sender, int), np.array(receiver, int), shifts)


@st.composite
def structures(draw):
    n = draw(st.integers(1, 7))
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(2.5, 9.0, 3)) + rng.normal(scale=0.8, size=(3, 3))
    positions = rng.uniform(0.0, 1.0, (n, 3)) @ cell
    positions += rng.integers(-3, 4, (n, 3)) @ cell * np.asarray(pbc)  # outside the cell
    positions += draw(st.sampled_from([0.0, 1e3, -1e6]))  # far from the origin
    if n > 1 and draw(st.booleans()):
        positions[-1] += rng.normal(size=3) * 10.0 ** draw(st.integers(2, 7))  # one far away
    return positions, cell, pbc, draw(st.sampled_from([2.0, 3.5, 5.0]))


@settings(max_examples=40, deadline=None)
@given(structures())
def test_neighbour_list_matches_brute_force(case) -> None:
    """Same edges (pairs and lengths) for positions anywhere, in or out of the cell."""
    positions, cell, pbc, r_max = case
    sender, receiver, shifts = neighbour_list(positions, cell, pbc, r_max)
    assert not shifts[:, ~np.asarray(pbc)].any()
    ours = distances(positions, cell, pbc, sender, receiver, shifts)
    expected = brute_force(positions, cell, pbc, r_max)
    for key in set(ours) | set(expected):  # edges at r_max may go either way by round-off
        mine = [d for d in ours.get(key, []) if abs(d - r_max) > 1e-6]
        theirs = [d for d in expected.get(key, []) if abs(d - r_max) > 1e-6]
        np.testing.assert_allclose(mine, theirs, atol=1e-6, err_msg=str(key))


def run_alone(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with numpy, vesin and ``neighbours`` (loaded as the
    graph workers load it, without torch), and no core dump if it crashes."""
    script = (
        "import numpy as np, vesin\n"
        "from crossfield.server.graph_worker import load_neighbours\n"
        f"neighbours = load_neighbours({neighbours_module.__file__!r})\n"
    ) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )


def test_vesin_dies_where_plan_grid_refuses_and_neighbour_list_does_not() -> None:
    """A 1000 x 1000 x 1 A periodic cell and a 3 A cutoff: vesin's grid (333 x 333 x 1 =
    1.1e5 cells) is shrunk to 1e5 keeping its aspect ratio, which truncates the thin axis to
    zero cells, and vesin divides by it. ``plan_grid`` predicts it; ``neighbour_list``
    refuses it with a ValueError instead of dying."""
    box, points = np.diag([1000.0, 1000.0, 1.0]), [[0.1, 0.1, 0.1], [0.5, 0.5, 0.5]]
    with pytest.raises(NeighbourListError, match="too elongated"):
        plan_grid(box, 3.0)
    raw = run_alone(
        f"""
        calculator = vesin.NeighborList(cutoff=3.0, full_list=True)
        calculator.compute(points=np.array({points}), box=np.array({box.tolist()}), periodic=True)
        """
    )
    assert raw.returncode == -signal.SIGFPE
    ours = run_alone(
        f"""
        try:
            neighbours.neighbour_list(np.array({points}), np.array({box.tolist()}), [True] * 3, 3.0)
        except neighbours.NeighbourListError as err:
            print("refused:", err)
        """
    )
    assert ours.returncode == 0, ours.stderr
    assert "refused: positions: the structure spans" in ours.stdout


def test_far_atoms_cost_nothing_in_process() -> None:
    """What killed or stalled the server through vesin, now answered at once in-process: a
    molecule with atoms 1e15 A apart, a slab with one atom 1e5 or 1e7 A above it."""
    result = run_alone(
        """
        import time
        water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
        slab = np.diag([20.0, 20.0, 0.0])
        cases = [
            (np.vstack([water, [1e15, 0, 0]]), None, [False] * 3),
            (np.vstack([water, [1, 2, 1e5]]), slab, [True, True, False]),
            (np.vstack([water, [1, 2, 1e7]]), slab, [True, True, False]),
        ]
        for positions, cell, pbc in cases:
            start = time.monotonic()
            sender, _, _ = neighbours.neighbour_list(positions, cell, pbc, 4.0)
            assert time.monotonic() - start < 5.0 and len(sender) >= 6, len(sender)
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_in_process_float32_answer_does_not_depend_on_where_the_molecule_is() -> None:
    """Water 1e7 A from the origin: float32 positions there are 1 A apart, so the model must
    see the structure centred (in float64) before its cast."""
    model = small_model(dtype=torch.float32)
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    near, far = evaluate(
        model,
        [Structure(np.array([8, 1, 1]), water + offset, head=HEADS[0]) for offset in (0.0, 1e7)],
    )
    assert abs(near["energy"] - far["energy"]) < 1e-4
    np.testing.assert_allclose(far["forces"], near["forces"], atol=1e-4)
