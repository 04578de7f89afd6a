"""What a structure's graph will cost, known before it is queued, and the limits on it.

The neighbour list and the model's memory grow with the number of edges, which only the
neighbour list itself knows. Two cheap numbers stand in for it (``count_pairs``, O(N log N)
on a grid of cells at least a cutoff wide, the way a cell list searches):

* ``bound``: for every atom, the atoms in the 27 cells around its own (periodic images
  included), minus itself. No neighbour lies outside that block, so this is a hard upper
  bound on the edges and on the pairs the neighbour list examines. It is up to ~6x high
  for uniform matter.
* ``estimate``: the block's density times the cutoff sphere, or the atom's own cell
  count if larger. Exact on average for uniform matter, exact for atoms piled on one spot,
  and at worst ~6x low for a cluster smaller than the cutoff that straddles cell corners.

The estimate plans batches and refuses the hopeless quickly (neighbours per atom, edges,
memory); the bound caps the neighbour list's own work and picks where it runs (in-process
or in a worker, see ``graphs.py``); after the neighbour list the exact edge count is
checked against the same limits, so an estimate that was low never reaches the model.
Memory is edges times the model's bytes per edge, measured once per model
(``bytes_per_edge``).
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, Structure, build_batch
from crossfield.model.neighbours import Frame, face_distances

from .errors import InvalidArgumentError

GIB = 1024**3
# Saved-for-backward tensors are most of the memory of an evaluation with forces; the rest
# is the backward pass's temporaries. Measured for the default model (float32 and float64,
# 512-1024 atoms): peak RSS 1.35-1.5x the saved bytes.
MEMORY_PER_SAVED_BYTE = 1.5
PROBE_ATOMS = 64
PROBE_NEIGHBOURS = 40.0  # per atom, a dense liquid or metal
MAX_PLAUSIBLE_BYTES_PER_EDGE = 1 << 20  # the default model needs ~12 KiB (float32)
DEVICE_GRAPHS = ("auto", "on", "off")


@dataclass(frozen=True)
class GraphLimits:
    """Per-structure limits on graph building and what it may cost (``crossfield serve``
    flags of the same names), and how untrusted graph building runs."""

    max_coordinate: float = 1e8  # A: beyond, float64 keeps < 1e-8 A of an atom's place
    max_neighbours_per_atom: float = 1000.0  # estimated; more means a cell in the wrong unit
    max_edges: int = 1 << 20  # per structure, estimated before queueing, exact after
    max_memory: float = 2.0 * GIB  # bytes per structure: edges x the model's bytes per edge
    in_process_pairs: int = 1 << 19  # neighbour-list bound up to which it runs in-process
    timeout: float = 10.0  # seconds a worker may spend on one structure
    workers: int = 1  # graph worker processes
    # neighbour lists on the model's device (model/device_graph.py): "auto" on CUDA only
    device_graphs: str = "auto"

    def __post_init__(self) -> None:
        if self.device_graphs not in DEVICE_GRAPHS:
            raise ValueError(
                f"device_graphs: {self.device_graphs!r} is not one of {list(DEVICE_GRAPHS)}"
            )
        for name in ("max_coordinate", "max_neighbours_per_atom", "max_memory", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_edges", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.in_process_pairs < 0:
            raise ValueError(f"in_process_pairs: must be >= 0, got {self.in_process_pairs}")

    @property
    def max_pairs(self) -> int:
        """Hard cap on the neighbour list's bound: the most work it may ever be given."""
        return 8 * self.max_edges


@dataclass(frozen=True)
class PairCount:
    bound: int  # hard upper bound on directed pairs within the cutoff
    estimate: int  # expected directed pairs (edges)


def quick_bound(frame: Frame, num_atoms: int, r_max: float) -> int:
    """An O(1) upper bound on the pairs: every atom with every atom, times the periodic
    images that can lie within the cutoff along each periodic direction."""
    images, faces = 1, face_distances(frame.box)
    for axis in np.flatnonzero(frame.periodic):
        images *= 2 * math.ceil(r_max / faces[axis]) + 2
    return num_atoms * max(num_atoms * images - 1, 0)


def count_pairs(frame: Frame, r_max: float) -> PairCount:
    """``bound`` and ``estimate`` of the module docstring, on a grid of cells at least
    ``r_max`` wide (periodic directions: whole divisions of the cell)."""
    box, periodic = frame.box, frame.periodic
    fractional = np.linalg.solve(box.T, frame.positions.T).T
    lengths = np.linalg.norm(box, axis=1)
    sizes, spans, offsets, multiplicity = [], [], [], 1
    index = np.zeros(fractional.shape, dtype=np.int64)
    cell_volume = abs(float(np.linalg.det(box)))
    faces = face_distances(box)
    for axis in range(3):
        if periodic[axis]:
            cells = max(1, int(faces[axis] // r_max))
            cell_volume /= cells
            search = math.ceil(r_max * cells / faces[axis])
            if 2 * search + 1 >= cells:  # the block wraps onto itself: count images instead
                repeat = math.ceil((2 * search + 1) / cells)
                multiplicity *= repeat
                sizes.append(1)
                spans.append(repeat * cells)
                offsets.append((0,))
                continue
            index[:, axis] = np.floor(fractional[:, axis] * cells).astype(np.int64) % cells
            sizes.append(cells)
        else:
            cell_volume *= r_max / lengths[axis]
            column = np.floor(fractional[:, axis] * lengths[axis] / r_max).astype(np.int64)
            index[:, axis] = column - column.min() + 1  # padded: a -1 offset stays >= 0
            sizes.append(int(index[:, axis].max()) + 2)
        spans.append(3)
        offsets.append((-1, 0, 1))
    cells, first, counts = np.unique(_keys(index, sizes), return_index=True, return_counts=True)
    around = np.zeros(len(cells), dtype=np.int64)
    for step in itertools.product(*offsets):
        moved = index[first] + np.array(step)
        moved[:, periodic] %= np.array(sizes)[periodic]
        keys = _keys(moved, sizes)
        found = np.minimum(np.searchsorted(cells, keys), len(cells) - 1)
        around += np.where(cells[found] == keys, counts[found], 0)
    around *= multiplicity
    ball = 4.0 / 3.0 * math.pi * r_max**3
    density = around * ball / (cell_volume * math.prod(spans))
    return PairCount(
        bound=int((counts * np.maximum(around - 1, 0)).sum()),
        estimate=int(max((counts * density).sum(), _close_pairs(fractional, lengths, r_max))),
    )


def _close_pairs(fractional: np.ndarray, lengths: np.ndarray, r_max: float) -> int:
    """A lower bound on the pairs: atoms sharing a cell whose edges are at most a third of
    the cutoff (so whose diameter is at most the cutoff) are surely neighbours."""
    divisions = np.ceil(3.0 * lengths / r_max)
    index = np.floor(fractional * divisions).astype(np.int64)
    index -= index.min(axis=0)
    sizes = [int(size) + 1 for size in index.max(axis=0)]
    _, counts = np.unique(_keys(index, sizes), return_counts=True)
    return int((counts * (counts - 1)).sum())


def _keys(index: np.ndarray, sizes: list[int]) -> np.ndarray:
    return (index[:, 0] * sizes[1] + index[:, 1]) * sizes[2] + index[:, 2]


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE_LOCK = threading.Lock()


def bytes_per_edge(model: torch.nn.Module) -> float:
    """Memory of evaluating energies and forces, per edge, for ``model`` (cached).

    Measured, not modelled: one evaluation of a dense 64-atom crystal, counting the bytes
    of every tensor autograd saves for the backward pass (device-independent, and exact
    for any architecture, imported ones included), times ``MEMORY_PER_SAVED_BYTE``.
    """
    with _PROBE_LOCK:
        if model not in _PROBED:
            _PROBED[model] = _probe(model)
        return _PROBED[model]


def _probe(model: torch.nn.Module) -> float:
    eager: CrossfieldMACE = getattr(model, "model", model)  # a compiled model's own module
    config = eager.config
    side = (PROBE_ATOMS * 4.0 / 3.0 * math.pi * config.r_max**3 / PROBE_NEIGHBOURS) ** (1 / 3)
    positions = np.random.default_rng(0).uniform(0.0, side, (PROBE_ATOMS, 3))
    numbers = np.full(PROBE_ATOMS, config.elements[0])
    crystal = Structure(numbers, positions, np.eye(3) * side, (True, True, True))
    device = next(eager.parameters()).device
    graph = build_batch(
        [crystal], config.elements, config.r_max, config.head_names, eager.dtype, device
    )
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        eager(graph, compute_forces=True, compute_stress=False)
    return MEMORY_PER_SAVED_BYTE * sum(storages.values()) / max(graph.num_edges, 1)


def check_edges(
    edges: int, num_atoms: int, model: torch.nn.Module, limits: GraphLimits, exact: bool
) -> None:
    """Refuse a structure whose ``edges`` exceed the edge or memory limit (estimated before
    queueing; ``exact`` after its neighbour list). The memory check measures the model's
    bytes per edge (``bytes_per_edge``) only once a structure could come near the limit:
    none we know needs 1 MiB per edge, so small structures never pay for the measurement.
    """
    how = "" if exact else "~"
    if edges > limits.max_edges:
        raise InvalidArgumentError(
            f"structure: {how}{edges} edges (neighbour pairs within the cutoff) for "
            f"{num_atoms} atoms exceed the limit of {limits.max_edges} per structure"
        )
    if edges * MAX_PLAUSIBLE_BYTES_PER_EDGE <= limits.max_memory:
        return
    if not exact and model not in _PROBED:  # never measure on the I/O loop; the exact
        return  # check after the neighbour list (a batcher thread) measures
    memory = edges * bytes_per_edge(model)
    if memory > limits.max_memory:
        raise InvalidArgumentError(
            f"structure: {how}{edges} edges for {num_atoms} atoms would need "
            f"{how}{memory / GIB:.3g} GiB to evaluate, beyond the limit of "
            f"{limits.max_memory / GIB:.3g} GiB per structure"
        )
