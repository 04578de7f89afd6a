"""The Verlet list: a neighbour list reused while atoms move a little.

An MD driver or an optimiser evaluates one structure over and over with its atoms moved
a little. Pairs within ``r_max + skin`` of the positions a list was built on include every
pair within ``r_max`` while no atom has moved more than ``skin / 2`` and the cell is
unchanged (two atoms approach each other by at most ``skin``), so a step keeps those
within ``r_max`` and gets exactly the edges a new neighbour list would give; a larger move
or a new cell rebuilds it. Each step is evaluated on its own canonical frame
(``neighbours.canonical_frame``), as a Compute request is, so its answer is Compute's.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter

from crossfield.model import CrossfieldMACE
from crossfield.model.graph import StructureGraph

from .graph_cost import check_edges, count_pairs, quick_bound
from .graphs import GraphBuilder
from .work import CheckedRequest

# A beyond the cutoff that a list reaches. Below neighbours.GAP (1 A): no pair within the
# list's reach may cross a gap that the canonical frame closes.
SKIN = 0.5


class VerletList:
    """The neighbour list a structure keeps between steps (an MD session's, a
    relaxation's): pairs within ``r_max + skin`` of the positions it was built on, as
    (sender, receiver, unit shifts) of the positions as sent, so that they stay valid while
    atoms move continuously (MD and optimiser positions are not wrapped back into the
    cell). Used by one thread at a time."""

    def __init__(self, skin: float, graphs: Counter) -> None:
        self.skin = skin
        self._graphs = graphs  # labelled by outcome: rebuilt or reused
        self._cutoff = 0.0  # the list's reach; 0: not built yet
        self._reference = np.zeros((0, 3))  # positions it was built on
        self._cell: np.ndarray | None = None
        self._sender = self._receiver = np.zeros(0, dtype=np.int64)
        self._shifts = np.zeros((0, 3), dtype=np.int64)

    def graph(
        self,
        model: CrossfieldMACE,
        builder: GraphBuilder,
        request: CheckedRequest,
        positions: np.ndarray,
    ) -> StructureGraph:
        """The graph of ``request`` (its canonical frame), whose ``positions`` as sent are
        compared with the list's; rebuilt first where the list no longer covers them."""
        r_max = model.config.r_max
        frame, cell = request.frame, request.structure.cell
        if self._stale(positions, cell, r_max + self.skin):
            self._build(builder, request, positions, r_max + self.skin)
            self._graphs.labels("rebuilt").inc()
        else:
            self._graphs.labels("reused").inc()
        sender, receiver = self._sender, self._receiver
        # Shifts for the canonical positions: input = canonical + wraps @ cell per atom (and
        # a translation shared by every atom within reach of each other).
        shifts = self._shifts - frame.wraps[sender] + frame.wraps[receiver]
        vectors = frame.positions[receiver] - frame.positions[sender]
        if frame.periodic.any():
            vectors += shifts @ cell
        keep = np.einsum("ij,ij->i", vectors, vectors) < r_max * r_max
        graph = StructureGraph(frame.positions, sender[keep], receiver[keep], shifts[keep])
        check_edges(graph.num_edges, request.num_atoms, model, builder.limits, exact=True)
        return graph

    def _stale(self, positions: np.ndarray, cell: np.ndarray | None, cutoff: float) -> bool:
        if cutoff != self._cutoff or len(positions) != len(self._reference):
            return True
        if (cell is None) != (self._cell is None) or (
            cell is not None and not np.array_equal(cell, self._cell)
        ):
            return True
        moved = positions - self._reference
        return float(np.einsum("ij,ij->i", moved, moved).max()) > 0.25 * self.skin**2

    def _build(
        self, builder: GraphBuilder, request: CheckedRequest, positions: np.ndarray, cutoff: float
    ) -> None:
        """Pairs within ``cutoff`` of the request's frame, found where its bound says (the
        validation's bound is for the cutoff alone; the skin reaches further)."""
        frame = request.frame
        bound = quick_bound(frame, request.num_atoms, cutoff)
        if bound > builder.limits.in_process_pairs:
            bound = count_pairs(frame, cutoff).bound
        sender, receiver, shifts = builder.pairs(frame, cutoff, bound)
        self._shifts = shifts + frame.wraps[sender] - frame.wraps[receiver]
        self._sender, self._receiver = sender, receiver
        self._reference = positions.copy()
        self._cell = None if request.structure.cell is None else request.structure.cell.copy()
        self._cutoff = cutoff
