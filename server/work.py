"""What travels through the server: a checked request, the work item that carries it
from the service through a batcher to a runner, and the result that comes back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossfield.model import Structure
from crossfield.model.neighbours import Frame


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed validation: what batching needs, nothing of gRPC."""

    structure: Structure  # head resolved to a name of the model
    properties: frozenset[str]  # subset of energy, forces, stress, atom_energies
    num_atoms: int
    estimated_edges: int
    frame: Frame  # the structure's canonical frame: what its neighbour list is built on
    pairs_bound: int  # hard upper bound on its neighbour pairs (graph_cost.py)
    # elements outside the head's training data, answered because the request allowed it
    extrapolated_elements: tuple[int, ...] = ()


@dataclass
class StructureResult:
    """The properties one structure asked for (float64 numpy), and where its time went."""

    energy: float | None = None
    forces: np.ndarray | None = None  # [n, 3] eV/A
    stress: np.ndarray | None = None  # [3, 3] eV/A^3
    atom_energies: np.ndarray | None = None  # [n] eV
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(eq=False)
class WorkItem:
    """One structure on its way to a runner.

    The future is the only channel back: the service awaits it. A caller that stops
    waiting withdraws the item through its batcher (``Batcher.withdraw``), which takes it
    out of the queue, or marks it ``abandoned`` once it is in a batch, so a batch whose
    every structure was abandoned never runs.
    """

    request: CheckedRequest
    deadline: float | None = None  # time.monotonic() after which nobody waits any more
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0
    taken: float = 0.0
    queued: bool = False  # in its batcher's queue (owned by the batcher's lock)
    abandoned: bool = False  # nobody waits for the result any more
    # Where its graph comes from when not from ``GraphBuilder.graph``: an MD session's kept
    # neighbour list, called with the model and the runner's GraphBuilder (``sessions.py``)
    graph_source: Callable[[Any, Any], Any] | None = None
    # Its graph, or the error building it gave, once built (``GraphBuilder.graph_of``):
    # ahead of its batch by its batcher's thread while the device is busy, or with its
    # batch; the lock makes it built once whichever thread comes first.
    graph: Any = None
    graph_lock: threading.Lock = field(default_factory=threading.Lock)
