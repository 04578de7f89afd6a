"""Graph building for a batch: untrusted work, done where it cannot hurt the server.

Every structure arrives checked (``validation.py``): in its canonical frame, with a cost
bound (``graph_cost.py``), and with a grid that vesin handles (``neighbours.plan_grid``).
Structures whose neighbour-list bound is at most ``GraphLimits.in_process_pairs`` are
proven cheap and built in-process (every MD step of a small system: no IPC hop, ~0.1 ms);
the others are built in worker processes with a time limit (``graph_workers.py``), where
a crash or a stall costs a worker, not the server, and the structure is refused alone as
poison. A graph is built once per structure (``graph_of``), by whichever thread comes
first: the batcher's ahead of the batch while the device is busy, or the one building the
batch. Either way the exact edge count is then checked against the limits, so an
estimate that was low never reaches the model, and any structure that fails here fails
alone: its batch-mates go on.

On a CUDA device (``GraphLimits.device_graphs``), a structure whose hard pair bound
already meets the exact limits, and that vesin-torch handles exactly there
(``device_graph.device_buildable``), gets its pairs found on the device when its batch is
collated instead (``DeviceGraph``): every check above has run by then, only the pair
search moves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np

from crossfield.model import CrossfieldMACE
from crossfield.model.device_graph import DeviceGraph, device_buildable
from crossfield.model.graph import StructureGraph
from crossfield.model.neighbours import Frame, frame_pairs

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
    ) -> tuple[list[WorkItem], list[StructureGraph | DeviceGraph]]:
        """The graphs of ``items``; an item whose graph fails gets its error (its future
        is completed here) and is left out of the returned items."""
        kept, graphs = [], []
        for item in items:
            try:
                graph = self.graph_of(model, item)
            except ServeError as err:
                item.future.set_exception(err)
                continue
            except ValueError as err:  # NeighbourListError: refused before it could run
                item.future.set_exception(InvalidArgumentError(f"structure.{err}"))
                continue
            except Exception as err:  # a bug, not the input: this structure fails alone
                log.error("graph building failed", exc_info=err)
                item.future.set_exception(
                    ComputeError(f"graph building failed: {type(err).__name__}: {err}")
                )
                continue
            kept.append(item)
            graphs.append(graph)
        return kept, graphs

    def build_ahead(self, model: CrossfieldMACE, items: Sequence[WorkItem]) -> None:
        """Build the graphs of queued ``items`` before their batch is taken (the batcher's
        thread, while the device runs the batch before): the runner then finds them built
        instead of leaving the device idle while it builds them. An error is kept on its
        item and given to its caller when the batch is built (``build``)."""
        for item in items:
            with contextlib.suppress(Exception):
                self.graph_of(model, item)

    def graph_of(self, model: CrossfieldMACE, item: WorkItem) -> StructureGraph | DeviceGraph:
        """The graph of ``item``, built once (an error too is kept and raised again): a
        thread that asks while another builds it waits for that one's result."""
        with item.graph_lock:
            if item.graph is None:
                try:
                    if item.graph_source is not None:  # a kept Verlet list (session, relaxation)
                        item.graph = item.graph_source(model, self)
                    else:
                        item.graph = self.graph(model, item.request)
                except Exception as err:
                    item.graph = err
            if isinstance(item.graph, Exception):
                raise item.graph
            return item.graph

    def graph(self, model: CrossfieldMACE, request: CheckedRequest) -> StructureGraph | DeviceGraph:
        frame, r_max = request.frame, model.config.r_max
        if self.on_device(model, request):
            return DeviceGraph(frame, r_max)
        graph = StructureGraph(frame.positions, *self.pairs(frame, r_max, request.pairs_bound))
        check_edges(graph.num_edges, request.num_atoms, model, self.limits, exact=True)
        return graph

    def pairs(
        self, frame: Frame, cutoff: float, bound: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``neighbours.frame_pairs`` of ``frame``: in-process when its pair ``bound``
        proves it cheap, else in a worker."""
        if bound <= self.limits.in_process_pairs:
            return frame_pairs(frame, cutoff)
        return self.workers.pairs(frame, cutoff)

    def on_device(self, model: CrossfieldMACE, request: CheckedRequest) -> bool:
        """Whether the structure's pairs are found on the model's device. No exact edge
        count is taken before the model runs there, so the hard bound must meet the limits
        the exact count would; on the CPU ("on"), vesin's CPU code runs outside a worker
        only for structures proven cheap, as in-process."""
        mode, device = self.limits.device_graphs, next(model.buffers()).device
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return False
        if device.type != "cuda" and request.pairs_bound > self.limits.in_process_pairs:
            return False
        if not device_buildable(request.frame, model.config.r_max, request.pairs_bound):
            return False
        try:
            check_edges(request.pairs_bound, request.num_atoms, model, self.limits, exact=True)
        except InvalidArgumentError:
            return False  # the bound cannot vouch for it: count the pairs exactly on the host
        return True

    def close(self) -> None:
        self.workers.close()
