"""Labelled configurations: reading them from files and batching them for training.

A file of any format ``ase.io.read`` understands becomes a list of :class:`Configuration`:
the model's :class:`~crossfield.model.Structure` plus its reference labels. Labels are
looked up under configurable keys, first in ``atoms.info`` / ``atoms.arrays`` and then in
the results of an attached calculator, because ASE's extxyz reader moves the standard
names (``energy``, ``forces``, ``stress``) into a ``SinglePointCalculator`` while keeping
custom names such as ``REF_energy`` in ``info``. A missing label is not an error: its
loss weight becomes zero, so partially labelled data sets train on what they have.

Files labelled for mace-torch train as they are: with the default keys, labels missing
under ``energy`` / ``forces`` / ``stress`` are taken from mace-torch's ``REF_energy``,
``REF_forces``, ``REF_stress`` (or ``REF_virials``), configurations are weighted by
``config_type_weights`` of their ``info["config_type"]``, and a file whose configurations
name their head in ``info["head"]`` gives each head only its own configurations.

Neighbour lists are built once per configuration (:func:`build_graphs`) and batches are
concatenations of those graphs, so an epoch costs no neighbour search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase.stress import voigt_6_to_full_3x3_stress

from crossfield.model.graph import GraphBatch, Structure, build_batch

# mace-torch's default keys, tried after ours when ours are left at their defaults
MACE_KEYS = {"energy": "REF_energy", "forces": "REF_forces", "stress": "REF_stress"}
MACE_VIRIALS = "REF_virials"
DEFAULT_CONFIG_TYPE = "Default"  # mace-torch's name for configurations without a type


@dataclass
class DataKeys:
    """Where the labels of a configuration live (``info``/``arrays`` keys or calculator
    results), and how configurations are weighted.

    ``head``: the ``info`` key naming a configuration's head (mace-torch's ``head``).
    ``config_type_weights``: loss weight per ``info["config_type"]`` (``Default`` for
    configurations without one), multiplied into ``weight``; types not listed weigh 1.
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"
    weight: str = "config_weight"
    energy_weight: str = "config_energy_weight"
    forces_weight: str = "config_forces_weight"
    stress_weight: str = "config_stress_weight"
    head: str = "head"
    config_type_weights: dict[str, float] = field(default_factory=dict)

    def candidates(self, label: str) -> tuple[str, ...]:
        """The keys tried for ``label``: the configured one, then mace-torch's."""
        key = getattr(self, label)
        if key == label and label in MACE_KEYS:
            return (key, MACE_KEYS[label])
        return (key,)


@dataclass
class Configuration:
    """One structure with its reference labels and loss weights.

    ``energy`` is the total energy in eV, ``forces`` eV/A, ``stress`` the full 3x3 tensor in
    eV/A^3 with ASE's sign convention ((1/V) dE/d(strain)). Missing labels are ``None`` and
    the corresponding weight is then ignored.
    """

    structure: Structure
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    weight: float = 1.0
    energy_weight: float = 1.0
    forces_weight: float = 1.0
    stress_weight: float = 1.0
    source: str = ""  # file and index, for error messages and provenance
    config_type: str = ""  # what kind of structure (info["config_type"]), for head coverage

    @property
    def num_atoms(self) -> int:
        return len(self.structure.numbers)

    @property
    def head(self) -> str | None:
        return self.structure.head


def _label(atoms, keys: tuple[str, ...], per_atom: bool):
    """A label from ``arrays``/``info`` under the first of ``keys`` present, else from the
    attached calculator."""
    store = atoms.arrays if per_atom else atoms.info
    results = getattr(getattr(atoms, "calc", None), "results", None) or {}
    for key in keys:
        if key in store:
            return store[key]
        if key in results:
            return results[key]
    return None


def _virials_stress(atoms, keys: DataKeys):
    """Stress from mace-torch's ``REF_virials`` (-V * stress), with default keys only."""
    if keys.stress != "stress" or MACE_VIRIALS not in atoms.info:
        return None
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    if volume < 1e-9:
        return None
    virials = np.asarray(atoms.info[MACE_VIRIALS], dtype=np.float64).reshape(-1)
    return -(voigt_6_to_full_3x3_stress(virials) if virials.size == 6 else virials) / volume


def _stress_tensor(value, source: str, key: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    if array.size == 6:
        return voigt_6_to_full_3x3_stress(array)
    if array.size == 9:
        return array.reshape(3, 3)
    raise ValueError(f"{source}: {key}: stress needs 6 (Voigt) or 9 values, got {array.size}")


def configuration_from_atoms(
    atoms, keys: DataKeys, head: str | None = None, source: str = ""
) -> Configuration:
    """Convert one ``ase.Atoms`` with labels into a :class:`Configuration`."""
    n = len(atoms)
    energy = _label(atoms, keys.candidates("energy"), per_atom=False)
    forces = _label(atoms, keys.candidates("forces"), per_atom=True)
    stress = _label(atoms, keys.candidates("stress"), per_atom=False)
    if stress is None:
        stress = _virials_stress(atoms, keys)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise ValueError(
                f"{source}: {keys.forces}: forces need shape ({n}, 3), got {forces.shape}"
            )
    if stress is not None:
        stress = _stress_tensor(stress, source, keys.stress)

    def number(key: str) -> float:
        value = atoms.info.get(key, 1.0)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key}: weight must be a number, got {value!r}") from None

    config_type = str(atoms.info.get("config_type", ""))
    type_weight = keys.config_type_weights.get(config_type or DEFAULT_CONFIG_TYPE, 1.0)
    return Configuration(
        structure=Structure.from_atoms(atoms, head=head),
        energy=None if energy is None else float(energy),
        forces=forces,
        stress=stress,
        weight=number(keys.weight) * float(type_weight),
        energy_weight=number(keys.energy_weight),
        forces_weight=number(keys.forces_weight),
        stress_weight=number(keys.stress_weight),
        source=source,
        config_type=config_type,
    )


def read_configurations(
    path: str | Path, keys: DataKeys | None = None, head: str | None = None, index: str = ":"
) -> list[Configuration]:
    """Read every configuration of a file in any format ``ase.io.read`` supports.

    When some configurations name ``head`` in ``info[keys.head]``, only those that name it
    are read (one file holding several heads' data, as mace-torch writes them); a file
    that never names ``head`` is all this head's.
    """
    import ase.io

    keys = keys or DataKeys()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    frames = ase.io.read(path, index=index)
    if not isinstance(frames, list):
        frames = [frames]
    indexed = list(enumerate(frames))
    if head is not None and any(a.info.get(keys.head) == head for a in frames):
        indexed = [(i, a) for i, a in indexed if a.info.get(keys.head) == head]
    return [
        configuration_from_atoms(atoms, keys, head=head, source=f"{path}[{i}]")
        for i, atoms in indexed
    ]


def split_validation(
    configs: Sequence[Configuration], fraction: float, seed: int
) -> tuple[list[Configuration], list[Configuration]]:
    """A reproducible random split of ``configs`` into (train, valid)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(configs))
    n_valid = max(1, int(round(fraction * len(configs))))
    valid = [configs[i] for i in sorted(order[:n_valid])]
    train = [configs[i] for i in sorted(order[n_valid:])]
    return train, valid


def systems_of(configs: Sequence[Configuration]) -> list[str] | None:
    """The sorted kinds of structure in ``configs``; None when no configuration says."""
    kinds = sorted({c.config_type for c in configs if c.config_type})
    return kinds or None


def elements_of(configs: Sequence[Configuration]) -> list[int]:
    """The sorted atomic numbers present in ``configs``."""
    present: set[int] = set()
    for c in configs:
        present.update(int(z) for z in np.unique(c.structure.numbers))
    return sorted(present)


# -- batching ----------------------------------------------------------------------------


@dataclass
class Targets:
    """Reference labels of a batch as tensors; weights are zero where a label is missing."""

    energy: torch.Tensor  # [B] eV
    forces: torch.Tensor  # [N, 3] eV/A
    stress: torch.Tensor  # [B, 3, 3] eV/A^3
    num_atoms: torch.Tensor  # [B]
    energy_weight: torch.Tensor  # [B] config weight x energy weight x head weight
    forces_weight: torch.Tensor  # [B]
    stress_weight: torch.Tensor  # [B]
    heads: torch.Tensor  # [B] head index
    labelled: torch.Tensor  # [B, 3] bool: energy, forces, stress present (for metrics)

    def to(self, device=None, dtype=None) -> Targets:
        def move(t: torch.Tensor) -> torch.Tensor:
            return (
                t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
            )

        return Targets(**{name: move(getattr(self, name)) for name in self.__dataclass_fields__})


def build_graphs(
    configs: Sequence[Configuration],
    elements: Sequence[int],
    r_max: float,
    head_names: Sequence[str],
) -> list[GraphBatch]:
    """One single-structure graph per configuration (the neighbour search, done once)."""
    graphs = []
    for c in configs:
        try:
            graphs.append(
                build_batch([c.structure], elements, r_max, head_names, dtype=torch.float64)
            )
        except ValueError as err:
            raise ValueError(f"{c.source}: {err}") from None
    return graphs


def concatenate_graphs(graphs: Sequence[GraphBatch]) -> GraphBatch:
    """Concatenate precomputed graphs into one ragged batch (offsets shifted)."""
    atom_counts = [g.num_atoms for g in graphs]
    offsets = np.concatenate([[0], np.cumsum(atom_counts)])
    return GraphBatch(
        node_elements=torch.cat([g.node_elements for g in graphs]),
        positions=torch.cat([g.positions for g in graphs]),
        cell=torch.cat([g.cell for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        unit_shifts=torch.cat([g.unit_shifts for g in graphs]),
        batch=torch.cat([g.batch + i for i, g in enumerate(graphs)]),
        ptr=torch.as_tensor(offsets, dtype=torch.long),
        heads=torch.cat([g.heads for g in graphs]),
    )


def build_targets(
    configs: Sequence[Configuration],
    head_names: Sequence[str],
    head_loss_weights: dict[str, float] | None = None,
) -> Targets:
    """Stack the labels of ``configs``; missing labels get zero weight and zero values."""
    head_loss_weights = head_loss_weights or {}
    energy, forces, stress, counts, heads = [], [], [], [], []
    w_energy, w_forces, w_stress, labelled = [], [], [], []
    for c in configs:
        head = head_names[0] if c.head is None else c.head
        base = c.weight * head_loss_weights.get(head, 1.0)
        n = c.num_atoms
        counts.append(n)
        heads.append(head_names.index(head))
        energy.append(0.0 if c.energy is None else c.energy)
        w_energy.append(0.0 if c.energy is None else base * c.energy_weight)
        forces.append(np.zeros((n, 3)) if c.forces is None else c.forces)
        w_forces.append(0.0 if c.forces is None else base * c.forces_weight)
        stress.append(np.zeros((3, 3)) if c.stress is None else c.stress)
        w_stress.append(0.0 if c.stress is None else base * c.stress_weight)
        labelled.append((c.energy is not None, c.forces is not None, c.stress is not None))
    f64 = torch.float64
    return Targets(
        energy=torch.tensor(energy, dtype=f64),
        forces=torch.as_tensor(np.concatenate(forces), dtype=f64),
        stress=torch.as_tensor(np.stack(stress), dtype=f64),
        num_atoms=torch.tensor(counts, dtype=torch.long),
        energy_weight=torch.tensor(w_energy, dtype=f64),
        forces_weight=torch.tensor(w_forces, dtype=f64),
        stress_weight=torch.tensor(w_stress, dtype=f64),
        heads=torch.tensor(heads, dtype=torch.long),
        labelled=torch.tensor(labelled, dtype=torch.bool).reshape(-1, 3),
    )


class Dataset:
    """Configurations with their precomputed graphs and targets, indexable by position.

    Targets of single configurations are built once and concatenated per batch, like the
    graphs, so the training loop only slices and stacks tensors.
    """

    def __init__(
        self,
        configs: Sequence[Configuration],
        elements: Sequence[int],
        r_max: float,
        head_names: Sequence[str],
        head_loss_weights: dict[str, float] | None = None,
    ) -> None:
        self.configs = list(configs)
        self.graphs = build_graphs(self.configs, elements, r_max, head_names)
        self.targets = [build_targets([c], head_names, head_loss_weights) for c in self.configs]

    def __len__(self) -> int:
        return len(self.configs)

    def batch(self, indices: Sequence[int]) -> tuple[GraphBatch, Targets]:
        graph = concatenate_graphs([self.graphs[i] for i in indices])
        parts = [self.targets[i] for i in indices]
        targets = Targets(
            **{
                name: torch.cat([getattr(t, name) for t in parts])
                for name in Targets.__dataclass_fields__
            }
        )
        return graph, targets

    def num_atoms(self, indices: Sequence[int]) -> int:
        return sum(self.configs[i].num_atoms for i in indices)
