"""From a recipe to labelled data sets on disk: geometries, splits, labels, data cards.

The geometries are made once per family (molecules, molecule pairs, bulk crystals, slabs)
and shared by every data set that uses the family, so the same geometry can carry labels
at several levels of theory (``info["geometry_id"]`` matches them up). Splits are drawn
per group (one MD trajectory or one rattled structure) from a hash of the seed and the
group name, so a geometry lands in the same split in every data set and correlated MD
snapshots never straddle train and test. Subsets (a data set using a fraction of a
family) are nested the same way.

Files are written as gzip-compressed extended XYZ with a zero timestamp, so the same
recipe on the same software gives byte-identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import write

from crossfield.training.datasets import geometry
from crossfield.training.datasets.cards import write_card
from crossfield.training.datasets.levels import get_level, label

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
FAMILIES = ("molecule", "molecule_pair", "bulk", "slab_adsorbate")
INFO_KEYS = ("config_type", "origin", "group", "geometry_id", "level_of_theory")


@dataclass(frozen=True)
class Recipe:
    """How many geometries of each family to make, and how to split them."""

    seed: int = 7
    molecules: geometry.Sampling = field(
        default_factory=lambda: geometry.Sampling(rattled=5, trajectories=1, snapshots=6)
    )
    molecule_names: tuple[str, ...] = ()  # empty: every organic molecule
    molecule_pairs: int = 60
    crystals: geometry.Sampling = field(
        default_factory=lambda: geometry.Sampling(
            rattled=6,
            trajectories=2,
            snapshots=6,
            steps_between=10,
            timestep_fs=2.0,
            temperatures_k=(300.0, 1500.0),
            rattle_std=(0.02, 0.10),
            max_strain=0.04,
        )
    )
    alloys: int = 8
    slabs: geometry.Sampling = field(
        default_factory=lambda: geometry.Sampling(
            rattled=2,
            trajectories=1,
            snapshots=3,
            steps_between=20,
            timestep_fs=1.0,
            rattle_std=(0.02, 0.08),
        )
    )
    slab_count: int = 40
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # labels with a larger force component are dropped: a geometry the MD driver pushed
    # into an unphysical contact (EMT's rough H/C/N/O parameters can do that)
    max_force: float = 50.0


QUICK = Recipe(
    molecules=geometry.Sampling(rattled=1, trajectories=1, snapshots=1, steps_between=5),
    molecule_names=("H2O", "CH3OH", "C2H4"),
    molecule_pairs=2,
    crystals=geometry.Sampling(
        rattled=1, trajectories=1, snapshots=1, steps_between=5, max_strain=0.03
    ),
    alloys=1,
    slabs=geometry.Sampling(rattled=1, trajectories=0),
    slab_count=2,
)


@dataclass(frozen=True)
class DataSetSpec:
    """One data set: one level of theory on (fractions of) some geometry families."""

    name: str
    level: str
    families: dict[str, float]  # family -> fraction of its groups that this set uses
    description: str


DATA_SETS: tuple[DataSetSpec, ...] = (
    DataSetSpec(
        "molecules_gfn2",
        "gfn2_xtb",
        {"molecule": 1.0, "molecule_pair": 1.0},
        "Organic molecules (H, C, N, O) and non-bonded molecule pairs: rattled copies "
        "and Langevin MD snapshots. The largest set: the pretraining level.",
    ),
    DataSetSpec(
        "molecules_surfaces_gfn1",
        "gfn1_xtb",
        {"molecule": 0.25, "molecule_pair": 0.25, "slab_adsorbate": 1.0},
        "A 25 % subset of the molecule geometries (the same geometries as in "
        "molecules_gfn2) plus fcc(111)/(100) slabs of Ni, Cu, Pd, Ag, Pt, Au with one "
        "adsorbate each: the small, chemically most diverse set.",
    ),
    DataSetSpec(
        "metals_surfaces_emt",
        "emt",
        {"bulk": 1.0, "slab_adsorbate": 1.0},
        "fcc metals and random binary alloys (Al, Ni, Cu, Pd, Ag, Pt, Au; rattled, "
        "strained, MD) plus the same slab-with-adsorbate geometries as "
        "molecules_surfaces_gfn1.",
    ),
)


def get_spec(name: str) -> DataSetSpec:
    for spec in DATA_SETS:
        if spec.name == name:
            return spec
    raise ValueError(f"data set {name!r}: choose one of {[s.name for s in DATA_SETS]}")


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(group: str, seed: int, fractions: Sequence[float]) -> str:
    u = _unit_hash(seed, "split", group)
    edges = np.cumsum(fractions) / np.sum(fractions)
    return SPLITS[int(np.searchsorted(edges, u, side="right"))]


def make_geometries(recipe: Recipe, families: Sequence[str]) -> dict[str, list[Atoms]]:
    """The geometries of the requested families; each family has its own random stream."""
    names = list(recipe.molecule_names) or None
    makers: dict[str, Callable[[np.random.Generator], list[Atoms]]] = {
        "molecule": lambda rng: geometry.molecules(
            get_level("gfn2_xtb").calculator, rng, recipe.molecules, names
        ),
        "molecule_pair": lambda rng: geometry.molecule_pairs(recipe.molecule_pairs, rng, names),
        "bulk": lambda rng: geometry.crystals(
            get_level("emt").calculator, rng, recipe.crystals, alloys=recipe.alloys
        ),
        "slab_adsorbate": lambda rng: geometry.slabs(
            get_level("emt").calculator, rng, recipe.slabs, recipe.slab_count
        ),
    }
    made = {}
    for family in families:
        if family not in makers:
            raise ValueError(f"geometry family {family!r}: choose one of {FAMILIES}")
        started = time.perf_counter()
        frames = makers[family](np.random.default_rng([recipe.seed, FAMILIES.index(family)]))
        for i, atoms in enumerate(frames):
            atoms.info["geometry_id"] = f"{family}-{i:05d}"
            atoms.info["split"] = split_of(atoms.info["group"], recipe.seed, recipe.split_fractions)
        made[family] = frames
        log.info("%s: %d geometries in %.1f s", family, len(frames), time.perf_counter() - started)
    return made


def select(spec: DataSetSpec, geometries: dict[str, list[Atoms]], seed: int) -> list[Atoms]:
    """The geometries of ``spec``: whole groups kept with probability = the family fraction."""
    chosen = []
    for family, fraction in spec.families.items():
        for atoms in geometries[family]:
            if fraction >= 1.0 or _unit_hash(seed, "subset", atoms.info["group"]) < fraction:
                chosen.append(atoms)
    return chosen


def extxyz_gz(frames: Sequence[Atoms]) -> bytes:
    """Extended XYZ text, gzip-compressed with a zero timestamp (reproducible bytes)."""
    text = io.StringIO()
    write(text, list(frames), format="extxyz")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as handle:
        handle.write(text.getvalue().encode())
    return buffer.getvalue()


def make_data_set(
    spec: DataSetSpec,
    geometries: dict[str, list[Atoms]],
    out_dir: Path,
    recipe: Recipe,
    recipe_name: str,
) -> dict[str, Any]:
    """Label the geometries of ``spec``, write its split files and data card; return the card."""
    level = get_level(spec.level)
    calculator = level.calculator()
    started = time.perf_counter()
    frames: dict[str, list[Atoms]] = {s: [] for s in SPLITS}
    failed = Counter()
    for atoms in select(spec, geometries, recipe.seed):
        labelled = label(atoms, calculator)
        if labelled is None:
            failed[f"{atoms.info['config_type']}: no converged label"] += 1
            continue
        if np.abs(labelled.get_forces()).max() > recipe.max_force:
            failed[f"{atoms.info['config_type']}: force above {recipe.max_force:g} eV/A"] += 1
            continue
        labelled.info = {k: atoms.info[k] for k in INFO_KEYS if k in atoms.info}
        labelled.info["level_of_theory"] = level.name
        frames[atoms.info["split"]].append(labelled)
    seconds = time.perf_counter() - started
    folder = out_dir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, chosen in frames.items():
        path = folder / f"{split}.extxyz.gz"
        path.write_bytes(extxyz_gz(chosen))
        files[split] = path
    log.info(
        "%s: %s labelled by %s in %.1f s (%d failed)",
        spec.name,
        {s: len(f) for s, f in frames.items()},
        level.method,
        seconds,
        sum(failed.values()),
    )
    generation = {
        "command": "crossfield data make" + ("" if recipe_name == "full" else f" --{recipe_name}"),
        "recipe": recipe_name,
        "recipe_settings": asdict(recipe),
        "families": spec.families,
        "label_seconds": round(seconds, 1),
        "failed_labels": dict(failed),
    }
    return write_card(folder, spec.name, spec.description, level, frames, files, generation)


def make_all(
    out_dir: Path, names: Sequence[str], recipe: Recipe, recipe_name: str
) -> list[dict[str, Any]]:
    """Make the named data sets, generating each geometry family they need once."""
    specs = [get_spec(n) for n in names]
    families = [f for f in FAMILIES if any(f in spec.families for spec in specs)]
    geometries = make_geometries(recipe, families)
    return [make_data_set(spec, geometries, out_dir, recipe, recipe_name) for spec in specs]
