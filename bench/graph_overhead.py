"""What untrusted-input handling costs per structure on the server's common path.

For MD-sized structures it times, in one process and interleaved (so that load on a
shared machine hits every column alike): vesin called directly on the raw input (what
graph building did before issue 15), the server's new per-structure check (canonical
frame, vesin grid check, cost bound), the neighbour list on the canonical frame, and the
same neighbour list built in a graph worker process (the IPC hop that only large
structures pay). Prints the median microseconds per structure.

Usage: python bench/graph_overhead.py [--rounds 9] [--calls 100] [--cutoff 4.5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import vesin
from ase.build import bulk, molecule

from crossfield.model.neighbours import canonical_frame, frame_pairs, plan_grid
from crossfield.server.graph_cost import quick_bound
from crossfield.server.graph_workers import GraphWorkers
from crossfield.server.validation import estimate_neighbours


def direct_vesin(positions, cell, pbc, r_max):
    """The neighbour list as it was called before: raw positions straight into vesin."""
    box = np.zeros((3, 3)) if cell is None else cell
    calculator = vesin.NeighborList(cutoff=r_max, full_list=True)
    return calculator.compute(
        points=positions, box=box, periodic=list(pbc) if any(pbc) else False, quantities="ijS"
    )


def server_check(positions, cell, pbc, r_max) -> None:
    """The graph part of ``validation.check_request`` for a small structure."""
    frame = canonical_frame(positions, cell, pbc, r_max)
    plan_grid(frame.box, r_max)
    quick_bound(frame, len(positions), r_max)
    estimate_neighbours(len(positions), cell, pbc, r_max)


def microseconds(function: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def time_case(positions, cell, pbc, r_max, workers, rounds: int, calls: int) -> list[float]:
    """Median microseconds of the four columns for one structure."""
    frame = canonical_frame(positions, cell, pbc, r_max)
    columns = [
        lambda: direct_vesin(positions, cell, pbc, r_max),
        lambda: server_check(positions, cell, pbc, r_max),
        lambda: frame_pairs(frame, r_max),
        lambda: workers.pairs(frame, r_max),
    ]
    for function in columns:
        function()  # warm up (starts the worker)
    times: list[list[float]] = [[] for _ in columns]
    for _ in range(rounds):
        for column, function in enumerate(columns):
            times[column].append(microseconds(function, calls))
    return [float(np.median(column)) for column in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--cutoff", type=float, default=4.5)
    args = parser.parse_args(argv)
    silicon = bulk("Si", "diamond", a=5.43, cubic=True)
    cases = {
        "water (3, open)": (molecule("H2O").positions, None, (False,) * 3),
        "ethanol (9, open)": (molecule("CH3CH2OH").positions, None, (False,) * 3),
        "Si (8, periodic)": (silicon.positions, silicon.cell.array, (True,) * 3),
        "Si (64, periodic)": ((silicon * 2).positions, (silicon * 2).cell.array, (True,) * 3),
    }
    workers = GraphWorkers(1, timeout=10.0)
    print(f"{'structure':20s} {'direct vesin':>13s} {'check':>7s} {'new NL':>7s} {'worker':>7s}")
    try:
        for name, (positions, cell, pbc) in cases.items():
            medians = time_case(positions, cell, pbc, args.cutoff, workers, args.rounds, args.calls)
            print(f"{name:20s} {medians[0]:13.0f}" + "".join(f" {m:7.0f}" for m in medians[1:]))
    finally:
        workers.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
