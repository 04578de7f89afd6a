"""Structures and the ragged graph batch that flows into the model.

Edge convention (mace-torch's): ``edge_index = [sender, receiver]`` and the edge vector is
``r_receiver - r_sender + unit_shift @ cell``; messages are summed onto the receiver.
Energies and forces do not depend on the choice; odd-l intermediate features flip sign.

Neighbour lists come from vesin (C++, O(N), per-axis periodicity, also a torch/GPU
backend), a well-kept library rather than our own cell lists: it is fast for the small
cells we serve and handles cells smaller than the cutoff and mixed periodicity correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import vesin


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


def neighbour_list(
    positions: np.ndarray, cell: np.ndarray | None, pbc: Sequence[bool], r_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs within ``r_max`` (both directions, no self pairs at zero shift).

    Returns ``(sender, receiver, unit_shifts)`` with ``r_receiver - r_sender + S @ cell``
    the edge vector.
    """
    pbc = np.asarray(pbc, dtype=bool)
    box = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        box = np.zeros((3, 3))
    elif not pbc.all():
        box = _fill_open_directions(positions, box, pbc, r_max)
    calculator = vesin.NeighborList(cutoff=float(r_max), full_list=True)
    i, j, shifts = calculator.compute(
        points=np.ascontiguousarray(positions, dtype=np.float64),
        box=box,
        periodic=pbc.tolist() if pbc.any() else False,
        quantities="ijS",
    )
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)


def _fill_open_directions(
    positions: np.ndarray, box: np.ndarray, pbc: np.ndarray, r_max: float
) -> np.ndarray:
    """Give open (non-periodic) directions lattice vectors when the cell is degenerate.

    No shift is ever applied along an open direction, so its vector only has to complete
    the periodic ones to a basis: we use unit vectors of their orthogonal complement,
    scaled longer than the structure.
    """
    if abs(np.linalg.det(box)) > 1e-8:
        return box
    box = box.copy()
    extent = float(np.ptp(positions, axis=0).max()) if len(positions) else 0.0
    periodic = box[pbc]
    complement = np.linalg.svd(periodic)[2][len(periodic) :]
    for vector, axis in zip(complement, np.flatnonzero(~pbc)):
        box[axis] = vector * (2.0 * extent + 2.0 * r_max + 1.0)
    return box


def build_batch(
    structures: Sequence[Structure],
    elements: Sequence[int],
    r_max: float,
    head_names: Sequence[str],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> GraphBatch:
    """Neighbour lists for every structure, concatenated into one ragged batch.

    Raises ``ValueError`` naming the structure and field for elements outside the table
    or unknown heads, so callers can turn it into a per-request error.
    """
    if not structures:
        raise ValueError("structures: need at least one structure")
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(elements, dtype=np.int64)] = np.arange(len(elements))
    node_elements, positions, cells, senders, receivers, shifts, heads = [], [], [], [], [], [], []
    offset = 0
    for index, s in enumerate(structures):
        numbers = np.asarray(s.numbers, dtype=np.int64)
        if numbers.size == 0:
            raise ValueError(f"structures[{index}].numbers: empty structure")
        bad = numbers[(numbers < 1) | (numbers > 118)]
        if bad.size == 0:
            bad = numbers[lookup[numbers] < 0]
        if bad.size:
            raise ValueError(
                f"structures[{index}].numbers: element {int(bad[0])} is not in the model's "
                f"element table {list(elements)}"
            )
        head = head_names[0] if s.head is None else s.head
        if head not in head_names:
            raise ValueError(
                f"structures[{index}].head: unknown head {head!r}; heads are {list(head_names)}"
            )
        pos = np.asarray(s.positions, dtype=np.float64).reshape(-1, 3)
        cell = np.zeros((3, 3)) if s.cell is None else np.asarray(s.cell, dtype=np.float64)
        sender, receiver, shift = neighbour_list(pos, cell, s.pbc, r_max)
        node_elements.append(lookup[numbers])
        positions.append(pos)
        cells.append(cell if any(s.pbc) else np.zeros((3, 3)))
        senders.append(sender + offset)
        receivers.append(receiver + offset)
        shifts.append(shift)
        heads.append(head_names.index(head))
        offset += len(numbers)
    counts = np.array([len(p) for p in positions])
    return GraphBatch(
        node_elements=torch.as_tensor(np.concatenate(node_elements), device=device),
        positions=torch.as_tensor(np.concatenate(positions), dtype=dtype, device=device),
        cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device),
        edge_index=torch.as_tensor(
            np.stack([np.concatenate(senders), np.concatenate(receivers)]), device=device
        ),
        unit_shifts=torch.as_tensor(np.concatenate(shifts), dtype=dtype, device=device),
        batch=torch.as_tensor(np.repeat(np.arange(len(counts)), counts), device=device),
        ptr=torch.as_tensor(np.concatenate([[0], np.cumsum(counts)]), device=device),
        heads=torch.as_tensor(np.asarray(heads, dtype=np.int64), device=device),
    )
