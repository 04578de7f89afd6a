"""Turn a ComputeRequest into a checked structure, or say exactly which field is wrong.

Everything that could make a batch fail is rejected here, before batching, so a bad
structure is answered alone and never reaches its batch-mates: unknown model, version or
head (NOT_FOUND); elements outside the model's table, misshaped or non-finite arrays, a
singular periodic cell, an empty or too-large structure (INVALID_ARGUMENT).

Graph building is untrusted work, so its inputs are bounded here too: coordinates (beyond
``GraphLimits.max_coordinate`` float64 has lost the atoms' places; byte-swapped arrays land
there), periodic cells (length, layers per cutoff), and the cost of the graph
(``graph_cost.py``: neighbours per atom, edges, memory). The structure leaves in its
canonical frame (``neighbours.canonical_frame``, float64): wrapped, gaps closed, centred,
with a neighbour grid vesin is known to handle, so that what runs later cannot crash and
a structure far from the origin gets the answer it gets at the origin.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from crossfield.model import Structure
from crossfield.model.neighbours import Frame, NeighbourListError, canonical_frame, plan_grid
from crossfield.v1 import inference_pb2
from crossfield.v1.arrays import from_array

from .coverage import check_coverage, symbols
from .errors import InvalidArgumentError, NotFoundError
from .graph_cost import GraphLimits, PairCount, check_edges, count_pairs, quick_bound
from .models import ServedModel
from .work import CheckedRequest

PROPERTY_NAMES = {
    inference_pb2.PROPERTY_ENERGY: "energy",
    inference_pb2.PROPERTY_FORCES: "forces",
    inference_pb2.PROPERTY_STRESS: "stress",
    inference_pb2.PROPERTY_ATOM_ENERGIES: "atom_energies",
}
DEFAULT_PROPERTIES = frozenset({"energy", "forces"})

# Upper density for estimating the edges of molecules (atoms/A^3; ice is ~0.1): only used
# to plan batches, never to reject.
CONDENSED_DENSITY = 0.15
# Periodic cells beyond these bounds are not atomistic cells of at most a few thousand
# atoms (they once crashed or stalled the neighbour list; ``neighbours.py`` now refuses
# what would, but these say more clearly what is wrong).
MAX_CELL_LENGTH = 1000.0  # A, every lattice vector of a periodic structure
MAX_IMAGES_PER_CUTOFF = 100  # periodic images along one direction within the cutoff


def resolve_head(served: ServedModel, request: inference_pb2.ComputeRequest) -> str:
    """The head the request names, or the model's default head (NOT_FOUND if unknown)."""
    names = served.model.config.head_names
    head = request.head or names[0]
    if head not in names:
        raise NotFoundError(f"head: model {served.name!r} has no head {head!r}; heads are {names}")
    return head


def check_request(
    served: ServedModel, request: inference_pb2.ComputeRequest, head: str
) -> CheckedRequest:
    """Validate the structure and properties of ``request`` for model ``served``."""
    limits = served.batcher.limits.graphs
    properties = check_properties(request)
    if not request.HasField("structure"):
        raise InvalidArgumentError("structure: missing")
    message = request.structure
    numbers = _numbers(message, served)
    extrapolated = check_coverage(
        served.model.config, served.name, head, numbers, request.allow_extrapolation
    )
    positions = check_positions(message, len(numbers), limits.max_coordinate)
    pbc = _pbc(message)
    cell = check_cell(message, pbc)
    return check_configuration(
        served, numbers, positions, cell, pbc, head, properties, extrapolated
    )


def check_configuration(
    served: ServedModel,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None,
    pbc: tuple[bool, bool, bool],
    head: str,
    properties: frozenset[str],
    extrapolated: tuple[int, ...] = (),
) -> CheckedRequest:
    """Check a structure whose arrays passed their own checks as a whole: stress needs a
    periodic structure, periodic layers, the canonical frame and the graph's cost.

    An MD session step comes here directly: its atoms were checked when the session
    started, its new positions and cell get every check that depends on them.
    """
    config = served.model.config
    limits = served.batcher.limits.graphs
    if "stress" in properties and not any(pbc):
        raise InvalidArgumentError(
            "properties: stress needs a periodic structure (set structure.pbc and structure.cell)"
        )
    if cell is not None and any(pbc):
        _check_cell_layers(cell, pbc, config.r_max)
    frame = _frame(positions, cell, pbc, config.r_max)
    _check_distinct(frame.positions)
    cost = _cost(frame, cell, config.r_max, limits, served)
    structure = Structure(numbers=numbers, positions=frame.positions, cell=cell, pbc=pbc, head=head)
    return CheckedRequest(
        structure=structure,
        properties=properties,
        num_atoms=len(numbers),
        estimated_edges=max(1, cost.estimate),
        frame=frame,
        pairs_bound=cost.bound,
        extrapolated_elements=extrapolated,
    )


def _check_distinct(positions: np.ndarray) -> None:
    """Refuse two atoms on one spot. A zero-length edge has no direction, so the model's
    output would be non-finite; that is caught after the model runs too, but only once the
    structure's batch ran, which under load means a whole queue wait for a certain error.
    Sorting costs ~0.1 ms per thousand atoms."""
    if len(positions) < 2:
        return
    order = np.lexsort(positions.T)
    ordered = positions[order]
    same = np.flatnonzero((ordered[1:] == ordered[:-1]).all(axis=1))
    if len(same):
        first, second = sorted(order[[same[0], same[0] + 1]])
        raise InvalidArgumentError(
            f"structure.positions: atoms {first} and {second} are at the same position"
        )


def _frame(positions: np.ndarray, cell, pbc, r_max: float) -> Frame:
    """The canonical frame, refused here if vesin could not take its grid."""
    try:
        frame = canonical_frame(positions, cell, pbc, r_max)
        plan_grid(frame.box, r_max)
    except NeighbourListError as err:
        raise InvalidArgumentError(f"structure.{err}") from None
    return frame


def _cost(
    frame: Frame, cell: np.ndarray | None, r_max: float, limits: GraphLimits, served: ServedModel
) -> PairCount:
    """Bound and estimate of the structure's edges, refused beyond ``limits``.

    A structure whose O(1) bound already lets it be built in-process skips the grid count
    (every small MD step); its estimate is then the mean-field one, for batching only.
    """
    num_atoms = len(frame.positions)
    quick = quick_bound(frame, num_atoms, r_max)
    if quick <= limits.in_process_pairs:
        mean_field = estimate_neighbours(num_atoms, cell, frame.periodic, r_max) * num_atoms
        cost = PairCount(bound=quick, estimate=min(quick, int(mean_field)))
    else:
        cost = count_pairs(frame, r_max)
    if cost.bound > limits.max_pairs:
        raise InvalidArgumentError(
            f"structure: up to {cost.bound} atom pairs for the neighbour list to examine "
            f"({num_atoms} atoms), beyond the limit of {limits.max_pairs}"
        )
    neighbours = cost.estimate / num_atoms
    if neighbours > limits.max_neighbours_per_atom:
        field, hint = (
            ("cell", "is the cell in Angstrom?")
            if frame.periodic.any()
            else ("positions", "denser than any matter; are the positions in Angstrom?")
        )
        raise InvalidArgumentError(
            f"structure.{field}: ~{neighbours:.0f} neighbours per atom within the cutoff of "
            f"{r_max} A (limit {limits.max_neighbours_per_atom:.0f}); {hint}"
        )
    check_edges(cost.estimate, num_atoms, served.model, limits, exact=False)
    return cost


def check_properties(
    request: inference_pb2.ComputeRequest | inference_pb2.SessionStep,
) -> frozenset[str]:
    names = set()
    for value in request.properties:
        if value == inference_pb2.PROPERTY_UNSPECIFIED:
            continue
        if value not in PROPERTY_NAMES:
            raise InvalidArgumentError(f"properties: unknown property value {value}")
        names.add(PROPERTY_NAMES[value])
    return frozenset(names) or DEFAULT_PROPERTIES


def _decode(message, name: str, prefix: str = "structure") -> np.ndarray:
    try:
        return from_array(getattr(message, name), field=f"{prefix}.{name}")
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None


def _numbers(message: inference_pb2.Structure, served: ServedModel) -> np.ndarray:
    if not message.HasField("numbers"):
        raise InvalidArgumentError("structure.numbers: missing")
    numbers = _decode(message, "numbers")
    if numbers.dtype.kind != "i":
        raise InvalidArgumentError(
            f"structure.numbers: must be INT32 or INT64, got {numbers.dtype}"
        )
    if numbers.ndim != 1:
        raise InvalidArgumentError(
            f"structure.numbers: must have shape [n], got {list(numbers.shape)}"
        )
    if numbers.size == 0:
        raise InvalidArgumentError("structure.numbers: empty structure (no atoms)")
    if numbers.size > served.max_atoms_per_structure:
        raise InvalidArgumentError(
            f"structure.numbers: {numbers.size} atoms exceed the limit of "
            f"{served.max_atoms_per_structure} atoms per structure"
        )
    numbers = numbers.astype(np.int64)
    in_range = (numbers >= 1) & (numbers <= 118)
    allowed = np.zeros(numbers.shape, dtype=bool)
    allowed[in_range] = served.element_allowed[numbers[in_range]]
    if not allowed.all():
        bad = int(numbers[np.argmin(allowed)])
        name = symbols([bad]) if 1 <= bad <= 118 else "unknown"
        raise InvalidArgumentError(
            f"structure.numbers: element {name} ({bad}) is not in the element table of model "
            f"{served.name!r}: {symbols(served.model.config.elements)}"
        )
    return numbers


def check_positions(
    message: inference_pb2.Structure | inference_pb2.SessionStep,
    num_atoms: int,
    max_coordinate: float,
    prefix: str = "structure",
) -> np.ndarray:
    """The positions of ``message`` as float64 [num_atoms, 3]; errors name
    ``<prefix>.positions``."""
    if not message.HasField("positions"):
        raise InvalidArgumentError(f"{prefix}.positions: missing")
    positions = _decode(message, "positions", prefix)
    if positions.dtype.kind != "f":
        raise InvalidArgumentError(
            f"{prefix}.positions: must be FLOAT64 or FLOAT32, got {positions.dtype}"
        )
    if positions.shape != (num_atoms, 3):
        raise InvalidArgumentError(
            f"{prefix}.positions: shape {list(positions.shape)} does not match "
            f"[{num_atoms}, 3] for {num_atoms} atoms"
        )
    if not np.isfinite(positions).all():
        raise InvalidArgumentError(f"{prefix}.positions: contains NaN or infinite values")
    largest = float(np.abs(positions).max())
    if largest > max_coordinate:
        raise InvalidArgumentError(
            f"{prefix}.positions: a coordinate of {largest:.3g} A is beyond the limit of "
            f"{max_coordinate:.3g} A; is the array little-endian, as the wire requires?"
        )
    return positions.astype(np.float64)


def _pbc(message: inference_pb2.Structure) -> tuple[bool, bool, bool]:
    if len(message.pbc) == 0:
        return (False, False, False)
    if len(message.pbc) != 3:
        raise InvalidArgumentError(f"structure.pbc: needs 0 or 3 flags, got {len(message.pbc)}")
    return (bool(message.pbc[0]), bool(message.pbc[1]), bool(message.pbc[2]))


def check_cell(
    message: inference_pb2.Structure | inference_pb2.SessionStep,
    pbc: tuple[bool, bool, bool],
    prefix: str = "structure",
) -> np.ndarray | None:
    """The cell of ``message`` as float64 [3, 3] (None for a molecule without one); errors
    name ``<prefix>.cell``."""
    if not message.HasField("cell"):
        if any(pbc):
            raise InvalidArgumentError(f"{prefix}.cell: missing, but structure.pbc is periodic")
        return None
    cell = _decode(message, "cell", prefix)
    if cell.dtype.kind != "f":
        raise InvalidArgumentError(f"{prefix}.cell: must be FLOAT64 or FLOAT32, got {cell.dtype}")
    if cell.shape != (3, 3):
        raise InvalidArgumentError(f"{prefix}.cell: must have shape [3, 3], got {list(cell.shape)}")
    if not np.isfinite(cell).all():
        raise InvalidArgumentError(f"{prefix}.cell: contains NaN or infinite values")
    cell = cell.astype(np.float64)
    longest = float(np.linalg.norm(cell, axis=1).max())
    if any(pbc) and longest > MAX_CELL_LENGTH:  # also before the covolume, which overflows
        raise InvalidArgumentError(
            f"{prefix}.cell: a lattice vector is {longest:.4g} A long (limit "
            f"{MAX_CELL_LENGTH:.0f} A for periodic structures); is the cell in Angstrom?"
        )
    periodic = cell[list(pbc)]
    if len(periodic) and _covolume(periodic) < 1e-6 * max(
        1.0, float(np.abs(periodic).max())
    ) ** len(periodic):
        raise InvalidArgumentError(
            f"{prefix}.cell: the periodic lattice vectors {periodic.tolist()} are singular "
            "(zero length or linearly dependent)"
        )
    return cell


def _check_cell_layers(cell: np.ndarray, pbc: tuple[bool, bool, bool], r_max: float) -> None:
    """Reject periodic cells so thin that the neighbour list would loop over images."""
    _check_cell_bytes(*_cell_key(cell, pbc), r_max)


# Cell checks are remembered per cell (its bytes): an MD run sends one cell thousands of
# times, and these few numpy calls on 3x3 arrays are a third of a session step's checks.
# A refused cell raises, which the cache does not keep.
def _cell_key(cell: np.ndarray, pbc) -> tuple[bytes, tuple[bool, bool, bool]]:
    """``cell`` and ``pbc`` as the hashable key of the caches below."""
    cell_bytes = np.ascontiguousarray(cell, dtype=np.float64).tobytes()
    return cell_bytes, (bool(pbc[0]), bool(pbc[1]), bool(pbc[2]))


@functools.lru_cache(maxsize=256)
def _check_cell_bytes(cell_bytes: bytes, pbc: tuple[bool, bool, bool], r_max: float) -> None:
    periodic = np.frombuffer(cell_bytes).reshape(3, 3)[list(pbc)]
    volume = _covolume(periodic)
    for index in range(len(periodic)):
        others = np.delete(periodic, index, axis=0)
        height = volume / _covolume(others) if len(others) else volume
        if r_max / height > MAX_IMAGES_PER_CUTOFF:
            raise InvalidArgumentError(
                f"structure.cell: periodic layers only {height:.3g} A apart put more than "
                f"{MAX_IMAGES_PER_CUTOFF} images within the cutoff of {r_max} A"
            )


def _covolume(vectors: np.ndarray) -> float:
    """Length, area or volume spanned by 1, 2 or 3 lattice vectors: sqrt(det(Gram))."""
    return math.sqrt(max(float(np.linalg.det(vectors @ vectors.T)), 0.0))


def estimate_neighbours(
    num_atoms: int, cell: np.ndarray | None, pbc: tuple[bool, bool, bool], r_max: float
) -> float:
    """Expected neighbours per atom within ``r_max``, for planning batches by edges.

    Along k periodic directions the atoms of one cell repeat on a k-dimensional lattice,
    so an atom sees about ``num_atoms * ball_k(r_max) / covolume_k`` others (exact on
    average for bulk, an upper estimate for slabs and wires). A molecule sees at most all
    other atoms, and no more than condensed matter packs into the cutoff sphere.
    """
    sphere = 4.0 / 3.0 * math.pi * r_max**3
    molecule = min(num_atoms - 1.0, CONDENSED_DENSITY * sphere)
    k = sum(pbc)
    if k == 0 or cell is None:
        return max(molecule, 0.0)
    ball = {1: 2.0 * r_max, 2: math.pi * r_max**2, 3: sphere}[k]
    return num_atoms * ball / _periodic_covolume(*_cell_key(cell, pbc))


@functools.lru_cache(maxsize=256)
def _periodic_covolume(cell_bytes: bytes, pbc: tuple[bool, bool, bool]) -> float:
    return _covolume(np.frombuffer(cell_bytes).reshape(3, 3)[list(pbc)])
