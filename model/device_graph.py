"""Neighbour lists on the model's device, for the whole batch (vesin-torch).

On a GPU the host neighbour list dominates inference of small structures (ACEsuit/mace
#1296): pairs found on the host must then cross to the device as the largest tensors of
the batch. Here the canonical positions (``neighbours.canonical_frame``, computed on the
host as before, since the server bounds untrusted inputs there first) cross once, and the
pairs are found where the model runs, by vesin-torch: the same library as the host path
(``neighbours.frame_pairs``), so the same pairs. On the CPU it runs vesin's CPU code,
which is how the tests check that edges are identical.

Chosen by measurement (``bench/device_graphs.py``, CPU, one thread,
docs/device_graphs.json): for 32 ethanol molecules vesin-torch takes 0.65 ms (all in one
call), nvalchemi-toolkit-ops' batched cell list 1.27 ms and the host path 2.2 ms; for a
500-atom crystal 2.0, 7.5 and 2.0 ms. nvalchemi also compiles its Warp kernels at first use
(5 s cold here) and needs warp-lang (150 MB), too big to travel to the GPU machines.

The whole batch in few calls:

* every molecule of the batch is one call: the molecules (centred by their canonical frame)
  are laid on a cubic lattice whose spacing exceeds each molecule's extent by more than the
  cutoff, in one periodic box of that lattice, so no pair joins two molecules or crosses
  the box (every shift is zero, which is checked) and the pairs are each molecule's own;
* every periodic structure is one call in its canonical box.

vesin's CUDA code has two limits that the host path lacks, so a structure goes to the
host path instead (``device_buildable``) where either could bite: it keeps one periodic
image per direction (box faces at least twice the cutoff apart), and its pair buffers
hold ``1.2 x 512`` pairs per point, so the structure's hard pair bound must fit in 512
per atom.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .graph import GraphBatch, Structure, StructureGraph, check_structures
from .neighbours import GAP, Frame, canonical_frame, face_distances, frame_pairs, plan_grid

DEVICE_PAIRS_PER_ATOM = 512  # VESIN_CUDA_MAX_PAIRS_PER_POINT: its buffers' capacity

_calculators = threading.local()  # one vesin-torch calculator per thread and cutoff


@dataclass(frozen=True)
class DeviceGraph:
    """A structure whose pairs are found on the device when its batch is collated
    (``graph.collate`` hands such batches to ``collate_on_device``)."""

    frame: Frame  # canonical, built for ``r_max``
    r_max: float

    @property
    def positions(self) -> np.ndarray:
        return self.frame.positions


def device_buildable(frame: Frame, r_max: float, pairs_bound: int | None = None) -> bool:
    """Whether vesin-torch builds this structure's pairs on a CUDA device exactly.

    ``pairs_bound`` is a hard upper bound on its directed pairs (the server's
    ``graph_cost.count_pairs``); without one, only the geometry is checked.
    """
    atoms = len(frame.positions)
    if pairs_bound is None:
        pairs_bound = _rough_bound(frame, r_max)
    if pairs_bound > DEVICE_PAIRS_PER_ATOM * atoms:
        return False
    if not frame.periodic.any():
        return True
    faces = face_distances(frame.box)
    return min(faces[axis] for axis in np.flatnonzero(frame.periodic)) >= 2.0 * r_max


def _rough_bound(frame: Frame, r_max: float) -> int:
    """Without the server's bound: every pair of a molecule, or for a periodic structure
    twice its mean density's neighbours (trusted inputs only: a dense pile of atoms in a
    large cell could exceed it)."""
    atoms = len(frame.positions)
    if not frame.periodic.any():
        return atoms * max(atoms - 1, 0)
    volume = abs(float(np.linalg.det(frame.box)))
    return math.ceil(2.0 * atoms * atoms / volume * 4.0 / 3.0 * math.pi * r_max**3)


def _vesin(r_max: float):
    from vesin_torch import NeighborList

    cache = _calculators.__dict__
    if r_max not in cache:
        cache[r_max] = NeighborList(cutoff=float(r_max), full_list=True)
    return cache[r_max]


def molecule_lattice(frames: Sequence[Frame], r_max: float) -> tuple[np.ndarray, float]:
    """Offsets [molecules, 3] that put each molecule on its own site of a cubic lattice,
    and the side of the periodic box the lattice fills.

    Canonical molecules are centred, so each lies within half its extent of its site;
    sites ``spacing`` apart then leave more than ``r_max + GAP`` between any two molecules,
    across the box's faces too. The spacing is at least ``2 r_max`` so that the box passes
    vesin's CUDA minimum-image check even for one molecule.
    """
    extent = max(
        float(np.ptp(f.positions, axis=0).max()) if len(f.positions) else 0.0 for f in frames
    )
    spacing = max(extent + r_max + GAP, 2.0 * r_max + GAP)
    side = math.ceil(len(frames) ** (1.0 / 3.0) - 1e-9)
    sites = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return sites[: len(frames)] * spacing, side * spacing


def device_pairs(
    frames: Sequence[Frame], positions: torch.Tensor, offsets: Sequence[int], r_max: float
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(sender, receiver, unit shifts) on ``positions.device`` for the structures whose
    canonical ``frames`` start at atom ``offsets`` of ``positions`` [N, 3] (float64): one
    vesin call for all the molecules, one per periodic structure. Indices are into
    ``positions``; shifts are int64, relative to each structure's cell."""
    device = positions.device
    calculator = _vesin(r_max)
    # vesin's CUDA code wants every input on the device, the periodicity flags too
    periodic = torch.ones(3, dtype=torch.bool, device=device)
    pieces = []
    molecules = [k for k, frame in enumerate(frames) if not frame.periodic.any()]
    for k, frame in enumerate(frames):
        if not frame.periodic.any():
            continue
        plan_grid(frame.box, r_max)
        start, count = offsets[k], len(frame.positions)
        box = torch.as_tensor(frame.box, dtype=torch.float64, device=device)
        i, j, shifts = calculator.compute(
            positions[start : start + count], box, periodic, quantities="ijS"
        )
        pieces.append((i.long() + start, j.long() + start, shifts.long()))
    if molecules:
        chosen = [frames[k] for k in molecules]
        sites, side = molecule_lattice(chosen, r_max)
        box = np.eye(3) * side
        plan_grid(box, r_max)
        points = np.concatenate([f.positions + site for f, site in zip(chosen, sites)])
        index = np.concatenate(
            [np.arange(offsets[k], offsets[k] + len(frames[k].positions)) for k in molecules]
        )
        index_t = torch.as_tensor(index, device=device)
        i, j, shifts = calculator.compute(
            torch.as_tensor(points, device=device),
            torch.as_tensor(box, device=device),
            periodic,
            quantities="ijS",
        )
        if bool(shifts.any()):  # the lattice's spacing guarantees this
            raise RuntimeError("device neighbour list: a pair joined two molecules")
        pieces.append((index_t[i.long()], index_t[j.long()], shifts.long()))
    return pieces


def collate_on_device(
    structures: Sequence[Structure],
    graphs: Sequence[StructureGraph | DeviceGraph],
    elements: Sequence[int],
    head_names: Sequence[str],
    dtype: torch.dtype,
    device: torch.device | str,
) -> GraphBatch:
    """One ragged batch on ``device`` from checked structures and their graphs: a
    ``StructureGraph`` brings pairs built on the host, a ``DeviceGraph`` gets them on the
    device (``device_pairs``). The batch equals ``graph.collate``'s for the same
    structures up to the order of edges."""
    device = torch.device(device)
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(elements, dtype=np.int64)] = np.arange(len(elements))
    counts = np.array([len(g.positions) for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    positions = torch.as_tensor(np.concatenate([g.positions for g in graphs]), device=device)
    host = [k for k, g in enumerate(graphs) if isinstance(g, StructureGraph)]
    pending = [k for k, g in enumerate(graphs) if not isinstance(g, StructureGraph)]
    pieces = []
    if host:
        sender = np.concatenate([graphs[k].sender + offsets[k] for k in host])
        receiver = np.concatenate([graphs[k].receiver + offsets[k] for k in host])
        shifts = np.concatenate([graphs[k].unit_shifts for k in host])
        pieces.append(tuple(torch.as_tensor(a, device=device) for a in (sender, receiver, shifts)))
    if pending:
        r_max = graphs[pending[0]].r_max
        if any(graphs[k].r_max != r_max for k in pending):
            raise ValueError("graphs: device graphs of one batch need one cutoff")
        frames = [graphs[k].frame for k in pending]
        pieces += device_pairs(frames, positions, [int(offsets[k]) for k in pending], r_max)
    sender, receiver, shifts = (torch.cat([p[n] for p in pieces]) for n in range(3))
    cells = [
        np.asarray(s.cell, dtype=np.float64) if any(s.pbc) else np.zeros((3, 3)) for s in structures
    ]
    heads = [head_names.index(head_names[0] if s.head is None else s.head) for s in structures]
    numbers = np.concatenate([np.asarray(s.numbers, dtype=np.int64) for s in structures])
    return GraphBatch(
        node_elements=torch.as_tensor(lookup[numbers], device=device),
        positions=positions.to(dtype),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device),
        edge_index=torch.stack([sender, receiver]),
        unit_shifts=shifts.to(dtype),
        batch=torch.as_tensor(np.repeat(np.arange(len(counts)), counts), device=device),
        ptr=torch.as_tensor(offsets, device=device),
        heads=torch.as_tensor(np.asarray(heads, dtype=np.int64), device=device),
    )


def build_batch_on_device(
    structures: Sequence[Structure],
    elements: Sequence[int],
    r_max: float,
    head_names: Sequence[str],
    dtype: torch.dtype,
    device: torch.device | str,
) -> GraphBatch:
    """``graph.build_batch`` with the pairs found on ``device`` where vesin-torch can
    (``device_buildable``), on the host otherwise. For trusted inputs: the server bounds
    untrusted ones first (``server/graphs.py``)."""
    check_structures(structures, elements, head_names)
    graphs: list[StructureGraph | DeviceGraph] = []
    for index, structure in enumerate(structures):
        try:
            frame = canonical_frame(structure.positions, structure.cell, structure.pbc, r_max)
            if device_buildable(frame, r_max):
                graphs.append(DeviceGraph(frame, r_max))
            else:
                graphs.append(StructureGraph(frame.positions, *frame_pairs(frame, r_max)))
        except ValueError as err:
            raise ValueError(f"structures[{index}].{err}") from None
    return collate_on_device(structures, graphs, elements, head_names, dtype, device)
