"""Neighbour lists that no finite input can crash or stall.

vesin (C++, O(N)) is fast and exact, but its CPU cell list (vesin 0.6,
``cpu_cell_list.cpp``) breaks on three kinds of input, and a break is a dead process:

* It lays one cell per cutoff along each direction, capped at 1e5 cells; past the cap it
  shrinks the grid keeping its aspect ratio, and a direction whose share truncates to 0
  cells is then divided by (integer division by zero: SIGFPE). A molecule with atoms 1e6 A
  apart along one axis does this, as does a slab with one atom 1e6 A out, or a 1000 x 1000
  x 1 A cell with a 3 A cutoff.
* With mixed periodicity it searches the whole grid along open directions from every
  cell: a slab with one atom 1e5 A above costs ~distance^2 and stalls for minutes.
* Atoms many cells outside a periodic cell overflow its int32 cell indices.

So vesin never sees raw input. Positions are first brought into a canonical frame
(``canonical_frame``): wrapped into the cell along periodic directions; along open
directions every gap wider than the cutoff closed to cutoff + 1 A (no pair crosses such a
gap, so neighbour pairs and their vectors are unchanged) and the structure centred. vesin
then gets a fully periodic box whose open directions are longer than the structure plus
the cutoff, so no image along them is ever within reach (and its quadratic mixed-periodicity
search never runs), and that box's grid is checked against vesin's own rule
(``plan_grid``) before it runs.

The canonical positions are an exact copy of the structure up to translations of
independent pieces, in float64: the model evaluates them directly, so a structure 1e7 A from
the origin gets the same float32 answer as at the origin.

This module imports numpy and vesin only (no torch): the server's graph worker processes
load it on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import vesin

GAP = 1.0  # A beyond the cutoff that a closed gap keeps (no pair may reach across it)
VESIN_MAX_CELLS = 1e5  # vesin's MAX_NUMBER_OF_CELLS: beyond it, vesin shrinks its grid
MAX_WRAPS = 2.0**52  # cells from the origin beyond which float64 keeps no sub-cell detail
MAX_GRID_VISITS = 1e9  # cell visits of vesin's search (seconds of work) we let it do


class NeighbourListError(ValueError):
    """An input the neighbour list refuses rather than crash or stall on."""


@dataclass(frozen=True)
class Frame:
    """A structure in the canonical frame: what vesin and the model see.

    ``input positions = positions + wraps @ cell`` plus a translation along open directions
    that is the same for every atom of a connected piece.
    """

    positions: np.ndarray  # [n, 3] float64
    wraps: np.ndarray  # [n, 3] int64 lattice vectors removed per atom (0 along open axes)
    box: np.ndarray  # [3, 3] fully periodic box for vesin; periodic rows are the cell's
    periodic: np.ndarray  # [3] bool


def canonical_frame(
    positions: np.ndarray, cell: np.ndarray | None, pbc: Sequence[bool], r_max: float
) -> Frame:
    """Wrap, close gaps and centre ``positions`` (see the module docstring).

    Raises ``NeighbourListError`` naming the field for non-finite positions, a singular
    periodic cell, or atoms so far outside the cell that float64 has lost their place in it.
    """
    points = np.array(positions, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(points).all():
        raise NeighbourListError("positions: contains NaN or infinite values")
    periodic = np.asarray(pbc, dtype=bool).reshape(3)
    basis = _basis(cell, periodic)
    wraps = np.zeros(points.shape, dtype=np.int64)
    coords = points
    if periodic.any():
        coords = np.linalg.solve(basis.T, points.T).T
        whole = np.floor(coords[:, periodic])
        if np.abs(whole).max(initial=0.0) > MAX_WRAPS:
            raise NeighbourListError(
                f"positions: atoms {np.abs(whole).max():.3g} cells outside the periodic cell"
            )
        coords[:, periodic] -= whole
        wraps[:, periodic] = whole.astype(np.int64)
    box = basis.copy()
    open_axes = np.flatnonzero(~periodic)
    if open_axes.size and len(coords):
        width = r_max + GAP
        ordered = np.sort(coords[:, open_axes], axis=0)
        for column in np.flatnonzero((np.diff(ordered, axis=0) > width).any(axis=0)):
            axis = open_axes[column]
            coords[:, axis] = close_gaps(coords[:, axis], width)
            ordered[:, column] = np.sort(coords[:, axis])
        low, high = ordered[0], ordered[-1]
        coords[:, open_axes] -= 0.5 * (low + high)
        box[open_axes] *= (high - low + width)[:, None]
    canonical = coords @ basis if periodic.any() else coords
    return Frame(positions=canonical, wraps=wraps, box=box, periodic=periodic)


def close_gaps(values: np.ndarray, width: float) -> np.ndarray:
    """``values`` with every gap wider than ``width`` (in sorted order) shrunk to it.

    Two atoms on either side of such a gap are further apart than ``width`` and stay so;
    atoms between the same two gaps move together, so their differences are unchanged.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    excess = np.maximum(np.diff(ordered) - width, 0.0)
    if not excess.any():
        return values
    closed = np.empty_like(values)
    closed[order] = ordered - np.concatenate([[0.0], np.cumsum(excess)])
    return closed


def plan_grid(box: np.ndarray, r_max: float) -> tuple[list[int], list[int]]:
    """vesin's cell grid for the fully periodic ``box``: (cells, search range) per axis.

    Mirrors vesin 0.6's ``CellList`` constructor, including its shrinking of grids beyond
    1e5 cells, and raises ``NeighbourListError`` where that would leave an axis without
    cells (vesin then divides by zero) or where the search would visit more than
    ``MAX_GRID_VISITS`` cells (periodic images of a cell far thinner than the cutoff).
    Plain floats: this runs for every structure, and numpy costs microseconds per call.
    """
    faces = face_distances(box)
    cells = [max(math.trunc(face / r_max), 1) for face in faces]
    if math.prod(cells) > VESIN_MAX_CELLS:
        ratio_xy, ratio_yz = cells[0] / cells[1], cells[1] / cells[2]
        z = float(np.cbrt(VESIN_MAX_CELLS / (ratio_xy * ratio_yz * ratio_yz)))
        y = ratio_yz * math.trunc(z)
        # The margin keeps us clear of vesin's own rounding on the way to the same numbers.
        if min(z, y, ratio_xy * math.trunc(y)) < 1.01:
            raise NeighbourListError(
                f"positions: the structure spans {[round(f, 1) for f in faces]} A, too "
                f"elongated for a neighbour grid of at most {VESIN_MAX_CELLS:.0f} cells"
            )
        cells = [math.trunc(ratio_xy * math.trunc(y)), math.trunc(y), math.trunc(z)]
    search = [max(math.ceil(r_max * c / f), 1) for c, f in zip(cells, faces)]
    visits = math.prod(cells) * math.prod(2 * s + 1 for s in search)
    if visits > MAX_GRID_VISITS:
        raise NeighbourListError(
            f"cell: periodic layers {min(faces):.3g} A apart put {max(search)} images "
            f"within the cutoff of {r_max} A ({visits:.3g} cell visits)"
        )
    return cells, search


def frame_pairs(frame: Frame, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs within ``r_max`` of the canonical positions: (sender, receiver,
    unit shifts), with ``r_receiver - r_sender + shift @ cell`` the edge vector.

    A molecule goes through vesin's open mode, whose grid is the atoms' bounding box
    (1% wider, at least 1 A): a periodic box would make vesin search 26 images of it for
    nothing (measured: 1.5-2x the time for small molecules).
    """
    calculator = vesin.NeighborList(cutoff=float(r_max), full_list=True)
    if frame.periodic.any():
        plan_grid(frame.box, r_max)
        box, periodic = frame.box, True
    else:
        extent = np.ptp(frame.positions, axis=0) if len(frame.positions) else np.zeros(3)
        plan_grid(np.diag(np.maximum(1.01 * extent, 1.0)), r_max)
        box, periodic = np.zeros((3, 3)), False
    i, j, shifts = calculator.compute(
        points=frame.positions, box=box, periodic=periodic, quantities="ijS"
    )
    shifts = shifts.astype(np.int64)
    if shifts[:, ~frame.periodic].any():  # the open box lengths guarantee this
        raise RuntimeError("neighbour list: a pair reached across an open direction")
    return i.astype(np.int64), j.astype(np.int64), shifts


def face_distances(box: np.ndarray) -> list[float]:
    """Distance between the two faces of ``box`` across each axis (plain floats)."""
    rows = box.tolist()
    normals = [_cross(rows[(k + 1) % 3], rows[(k + 2) % 3]) for k in range(3)]
    volume = abs(sum(a * b for a, b in zip(rows[0], normals[0])))
    return [volume / math.sqrt(sum(x * x for x in normal)) for normal in normals]


def _cross(a: list[float], b: list[float]) -> list[float]:
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def neighbour_list(
    positions: np.ndarray, cell: np.ndarray | None, pbc: Sequence[bool], r_max: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs within ``r_max`` (both directions, no self pairs at zero shift).

    Returns ``(sender, receiver, unit_shifts)`` with ``r_receiver - r_sender + S @ cell`` the
    edge vector for the positions as given (not the canonical ones).
    """
    frame = canonical_frame(positions, cell, pbc, r_max)
    sender, receiver, shifts = frame_pairs(frame, r_max)
    return sender, receiver, shifts + frame.wraps[sender] - frame.wraps[receiver]


def _basis(cell: np.ndarray | None, periodic: np.ndarray) -> np.ndarray:
    """Rows: the cell's periodic lattice vectors, and unit vectors perpendicular to them in
    place of the open ones (a periodic cell's open rows may be anything, even zero)."""
    count = int(periodic.sum())
    if count == 0:
        return np.eye(3)
    if cell is None:
        raise NeighbourListError("cell: missing, but pbc is periodic")
    lattice = np.asarray(cell, dtype=np.float64).reshape(3, 3)[periodic]
    if not np.isfinite(lattice).all():
        raise NeighbourListError("cell: contains NaN or infinite values")
    if count == 3:  # no complement to find: a determinant is enough (and 10x cheaper)
        rows = lattice.tolist()
        volume = abs(sum(a * b for a, b in zip(rows[0], _cross(rows[1], rows[2]))))
        lengths = [math.sqrt(sum(x * x for x in row)) for row in rows]
        if not volume > 1e-10 * math.prod(lengths):
            raise NeighbourListError(f"cell: the periodic lattice vectors {rows} are singular")
        return lattice
    _, singular, rows = np.linalg.svd(lattice)
    if not singular.min() > 1e-10 * singular.max():
        raise NeighbourListError(
            f"cell: the periodic lattice vectors {lattice.tolist()} are singular"
        )
    basis = np.empty((3, 3))
    basis[periodic] = lattice
    basis[~periodic] = rows[count:]
    return basis
