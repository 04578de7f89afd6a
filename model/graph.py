"""Structures and the ragged graph batch that flows into the model.

Edge convention (mace-torch's): ``edge_index = [sender, receiver]`` and the edge vector is
``r_receiver - r_sender + unit_shift @ cell``; messages are summed onto the receiver.
Energies and forces do not depend on the choice; odd-l intermediate features flip sign.

Neighbour lists come from vesin (C++, O(N), per-axis periodicity, also a torch/GPU
backend), a well-kept library rather than our own cell lists, behind ``neighbours.py``,
which brings every structure into a canonical frame first so that no finite input can
crash or stall it. The batch holds those canonical positions (float64 until the batch is
cast): a structure far from the origin gives the same answer as at the origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .neighbours import canonical_frame, frame_pairs, neighbour_list


@dataclass
class Structure:
    """One atomic structure in plain numpy: what a request or a data file carries."""

    numbers: np.ndarray  # [n] atomic numbers
    positions: np.ndarray  # [n, 3] Angstrom
    cell: np.ndarray | None = None  # [3, 3] rows are lattice vectors, Angstrom
    pbc: tuple[bool, bool, bool] = (False, False, False)
    head: str | None = None  # None: the model's default (first) head

    @classmethod
    def from_atoms(cls, atoms, head: str | None = None) -> Structure:
        return cls(
            numbers=np.asarray(atoms.numbers, dtype=np.int64),
            positions=np.asarray(atoms.positions, dtype=np.float64),
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=tuple(bool(p) for p in atoms.pbc),
            head=head,
        )


@dataclass
class GraphBatch:
    """A ragged batch of structures as tensors; every structure carries its own head."""

    node_elements: torch.Tensor  # [N] index into the model's element table
    positions: torch.Tensor  # [N, 3]
    cell: torch.Tensor  # [B, 3, 3] (zeros for molecules)
    edge_index: torch.Tensor  # [2, E] sender, receiver
    unit_shifts: torch.Tensor  # [E, 3] integer lattice shifts, stored in the float dtype
    batch: torch.Tensor  # [N] structure index of every atom
    ptr: torch.Tensor  # [B + 1] atom offsets
    heads: torch.Tensor  # [B] head index of every structure

    @property
    def num_structures(self) -> int:
        return int(self.ptr.numel() - 1)

    @property
    def num_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GraphBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return GraphBatch(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


@dataclass
class StructureGraph:
    """One structure's neighbour list, for the canonical positions it was built on."""

    positions: np.ndarray  # [n, 3] float64, canonical (see neighbours.canonical_frame)
    sender: np.ndarray  # [E]
    receiver: np.ndarray  # [E]
    unit_shifts: np.ndarray  # [E, 3] int64

    @property
    def num_edges(self) -> int:
        return int(self.sender.shape[0])


def structure_graph(structure: Structure, r_max: float) -> StructureGraph:
    """Canonical positions and neighbour list of ``structure`` (``NeighbourListError``, a
    ``ValueError``, for inputs the neighbour list refuses)."""
    frame = canonical_frame(structure.positions, structure.cell, structure.pbc, r_max)
    return StructureGraph(frame.positions, *frame_pairs(frame, r_max))


def check_structures(
    structures: Sequence[Structure], elements: Sequence[int], head_names: Sequence[str]
) -> None:
    """Raise ``ValueError`` naming the structure and field for elements outside the table
    or unknown heads, so callers can turn it into a per-request error."""
    if not structures:
        raise ValueError("structures: need at least one structure")
    allowed = np.zeros(119, dtype=bool)
    allowed[np.asarray(elements, dtype=np.int64)] = True
    for index, s in enumerate(structures):
        numbers = np.asarray(s.numbers, dtype=np.int64)
        if numbers.size == 0:
            raise ValueError(f"structures[{index}].numbers: empty structure")
        bad = numbers[(numbers < 1) | (numbers > 118)]
        if bad.size == 0:
            bad = numbers[~allowed[numbers]]
        if bad.size:
            raise ValueError(
                f"structures[{index}].numbers: element {int(bad[0])} is not in the model's "
                f"element table {list(elements)}"
            )
        if s.head is not None and s.head not in head_names:
            raise ValueError(
                f"structures[{index}].head: unknown head {s.head!r}; heads are {list(head_names)}"
            )


def build_batch(
    structures: Sequence[Structure],
    elements: Sequence[int],
    r_max: float,
    head_names: Sequence[str],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> GraphBatch:
    """Neighbour lists for every structure, concatenated into one ragged batch.

    Raises ``ValueError`` naming the structure and field for elements outside the table,
    unknown heads, or inputs the neighbour list refuses.
    """
    check_structures(structures, elements, head_names)
    graphs = []
    for index, structure in enumerate(structures):
        try:
            graphs.append(structure_graph(structure, r_max))
        except ValueError as err:
            raise ValueError(f"structures[{index}].{err}") from None
    return collate(structures, graphs, elements, head_names, dtype, device)


def collate(
    structures: Sequence[Structure],
    graphs: Sequence[StructureGraph],
    elements: Sequence[int],
    head_names: Sequence[str],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> GraphBatch:
    """One ragged batch from checked structures (``check_structures``) and their graphs;
    graphs whose pairs are still to be found on the device (``device_graph.DeviceGraph``)
    go through ``device_graph.collate_on_device``."""
    if not all(isinstance(g, StructureGraph) for g in graphs):
        from .device_graph import collate_on_device

        return collate_on_device(structures, graphs, elements, head_names, dtype, device)
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(elements, dtype=np.int64)] = np.arange(len(elements))
    offsets = np.cumsum([0] + [len(g.positions) for g in graphs])
    cells = [
        np.asarray(s.cell, dtype=np.float64) if any(s.pbc) else np.zeros((3, 3)) for s in structures
    ]
    heads = [head_names.index(head_names[0] if s.head is None else s.head) for s in structures]
    counts = np.diff(offsets)
    return GraphBatch(
        node_elements=torch.as_tensor(
            lookup[np.concatenate([np.asarray(s.numbers, dtype=np.int64) for s in structures])],
            device=device,
        ),
        positions=torch.as_tensor(
            np.concatenate([g.positions for g in graphs]), dtype=dtype, device=device
        ),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device),
        edge_index=torch.as_tensor(
            np.stack(
                [
                    np.concatenate([g.sender + o for g, o in zip(graphs, offsets)]),
                    np.concatenate([g.receiver + o for g, o in zip(graphs, offsets)]),
                ]
            ),
            device=device,
        ),
        unit_shifts=torch.as_tensor(
            np.concatenate([g.unit_shifts for g in graphs]), dtype=dtype, device=device
        ),
        batch=torch.as_tensor(np.repeat(np.arange(len(counts)), counts), device=device),
        ptr=torch.as_tensor(offsets, device=device),
        heads=torch.as_tensor(np.asarray(heads, dtype=np.int64), device=device),
    )


__all__ = [
    "GraphBatch",
    "Structure",
    "StructureGraph",
    "build_batch",
    "check_structures",
    "collate",
    "neighbour_list",
    "structure_graph",
]
