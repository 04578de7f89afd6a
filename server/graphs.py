"""Graph building for a batch: untrusted work, done where it cannot hurt the server.

Every structure arrives checked (``validation.py``): in its canonical frame, with a cost
bound (``graph_cost.py``), and with a grid that vesin handles (``neighbours.plan_grid``).
Structures whose neighbour-list bound is at most ``GraphLimits.in_process_pairs`` are
proven cheap and built in-process (every MD step of a small system: no IPC hop, ~0.1 ms);
the others are built in worker processes with a time limit (``graph_workers.py``), where
a crash or a stall costs a worker, not the server, and the structure is refused alone as
poison. Either way the exact edge count is then checked against the limits, so an
estimate that was low never reaches the model, and any structure that fails here fails
alone: its batch-mates go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from crossfield.model import CrossfieldMACE
from crossfield.model.graph import StructureGraph
from crossfield.model.neighbours import frame_pairs

from .errors import ComputeError, InvalidArgumentError, ServeError
from .graph_cost import GraphLimits, check_edges
from .graph_workers import GraphWorkers
from .work import CheckedRequest, WorkItem

log = logging.getLogger(__name__)


class GraphBuilder:
    """Neighbour lists for the batches of one runner, with its pool of graph workers."""

    def __init__(self, limits: GraphLimits) -> None:
        self.limits = limits
        self.workers = GraphWorkers(limits.workers, limits.timeout)

    def build(
        self, model: CrossfieldMACE, items: Sequence[WorkItem]
    ) -> tuple[list[WorkItem], list[StructureGraph]]:
        """The graphs of ``items``; an item whose graph fails gets its error (its future
        is completed here) and is left out of the returned items."""
        kept, graphs = [], []
        for item in items:
            try:
                graph = self.graph(model, item.request)
            except ServeError as err:
                item.future.set_exception(err)
                continue
            except ValueError as err:  # NeighbourListError: refused before it could run
                item.future.set_exception(InvalidArgumentError(f"structure.{err}"))
                continue
            except Exception as err:  # a bug, not the input: this structure fails alone
                log.exception("graph building failed")
                item.future.set_exception(
                    ComputeError(f"graph building failed: {type(err).__name__}: {err}")
                )
                continue
            kept.append(item)
            graphs.append(graph)
        return kept, graphs

    def graph(self, model: CrossfieldMACE, request: CheckedRequest) -> StructureGraph:
        frame, r_max = request.frame, model.config.r_max
        if request.pairs_bound <= self.limits.in_process_pairs:
            pairs = frame_pairs(frame, r_max)
        else:
            pairs = self.workers.pairs(frame, r_max)
        graph = StructureGraph(frame.positions, *pairs)
        check_edges(graph.num_edges, request.num_atoms, model, self.limits, exact=True)
        return graph

    def close(self) -> None:
        self.workers.close()
