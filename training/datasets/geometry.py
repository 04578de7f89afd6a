"""Unlabelled configurations: molecules, molecule pairs, bulk crystals, slabs with adsorbates.

Every configuration is an ``ase.Atoms`` whose ``info`` says what it is (``config_type``),
where it came from (``origin``) and which *group* it belongs to. A group is one MD
trajectory or one independently rattled structure; splits are drawn per group so that
correlated MD snapshots never sit on both sides of a train/test boundary.

Off-equilibrium sampling is what a force field needs to learn forces: Gaussian rattling,
random strain of the cell (crystals) and short Langevin trajectories at 300-1500 K driven
by a cheap calculator (``driver``), snapshots taken far enough apart to decorrelate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc111, molecule
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.collections import g2
from ase.data import atomic_numbers, covalent_radii, reference_states
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

Driver = Callable[[], Calculator]

ORGANIC = frozenset("HCNO")
# Larger closed-shell molecules that ``ase.build.molecule`` knows outside the G2 set.
EXTRA_MOLECULES = ("C7NH5", "biphenyl")
# g2 names that are excited or high-spin states of a species already present
EXCLUDED_MOLECULES = frozenset({"CH2_s1A1d", "CH2_s3B1d"})

BULK_METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
SLAB_METALS = ("Ni", "Cu", "Pd", "Ag", "Pt", "Au")

# adsorbates as (symbol, offset from the binding atom in A), binding atom first, z up
ADSORBATES: dict[str, list[tuple[str, tuple[float, float, float]]]] = {
    "H": [("H", (0.0, 0.0, 0.0))],
    "O": [("O", (0.0, 0.0, 0.0))],
    "N": [("N", (0.0, 0.0, 0.0))],
    "C": [("C", (0.0, 0.0, 0.0))],
    "OH": [("O", (0.0, 0.0, 0.0)), ("H", (0.0, 0.0, 0.97))],
    "CO": [("C", (0.0, 0.0, 0.0)), ("O", (0.0, 0.0, 1.15))],
    "NH2": [("N", (0.0, 0.0, 0.0)), ("H", (0.82, 0.0, 0.58)), ("H", (-0.82, 0.0, 0.58))],
    "CH3": [
        ("C", (0.0, 0.0, 0.0)),
        ("H", (1.03, 0.0, 0.36)),
        ("H", (-0.51, 0.89, 0.36)),
        ("H", (-0.51, -0.89, 0.36)),
    ],
    "H2O": [("O", (0.0, 0.0, 0.0)), ("H", (0.76, 0.0, 0.59)), ("H", (-0.76, 0.0, 0.59))],
}
# The binding atom sits at a typical bond length from its nearest metal atoms: the sum
# of covalent radii times this factor (ontop sites are thereby higher than hollows).
BOND_FACTOR = 1.0


@dataclass(frozen=True)
class Sampling:
    """How many configurations to make per starting structure, and how hard to perturb them."""

    rattled: int = 4
    trajectories: int = 1
    snapshots: int = 6
    steps_between: int = 20
    timestep_fs: float = 0.5
    temperatures_k: tuple[float, float] = (300.0, 1000.0)
    rattle_std: tuple[float, float] = (0.01, 0.08)
    max_strain: float = 0.0


def organic_molecules() -> list[str]:
    """Closed-shell H/C/N/O molecules with at least three atoms (G2 set plus two larger)."""
    names = []
    for name in g2.names:
        atoms = g2[name]
        if name in EXCLUDED_MOLECULES or len(atoms) < 3:
            continue
        if not set(atoms.get_chemical_symbols()) <= ORGANIC:
            continue
        closed_shell = abs(atoms.get_initial_magnetic_moments()).sum() == 0
        if closed_shell and sum(atoms.numbers) % 2 == 0:
            names.append(name)
    return sorted(names) + list(EXTRA_MOLECULES)


def _tag(atoms: Atoms, config_type: str, origin: str, group: str) -> Atoms:
    atoms.info.update(config_type=config_type, origin=origin, group=group)
    return atoms


def _rattle(atoms: Atoms, rng: np.random.Generator, std_range: tuple[float, float]) -> float:
    std = float(rng.uniform(*std_range))
    atoms.positions += rng.normal(0.0, std, atoms.positions.shape)
    return std


def _strain(atoms: Atoms, rng: np.random.Generator, max_strain: float) -> float:
    """Random symmetric strain with components up to ``max_strain``; returns its norm."""
    if max_strain <= 0:
        return 0.0
    eps = rng.uniform(-max_strain, max_strain, (3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return float(np.linalg.norm(eps))


def trajectory(
    atoms: Atoms, driver: Driver, rng: np.random.Generator, sampling: Sampling
) -> Iterator[tuple[Atoms, float]]:
    """Snapshots of one Langevin run; stops early if the driver fails (e.g. no SCF)."""
    temperature = float(rng.uniform(*sampling.temperatures_k))
    atoms = atoms.copy()
    atoms.calc = driver()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dynamics = Langevin(
        atoms,
        timestep=sampling.timestep_fs * units.fs,
        temperature_K=temperature,
        friction=0.02,
        fixcm=False,
        rng=rng,
    )
    for _ in range(sampling.snapshots):
        try:
            dynamics.run(sampling.steps_between)
        except CalculationFailed:
            return
        snapshot = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        yield snapshot, temperature


def perturbed(
    start: Atoms,
    config_type: str,
    origin: str,
    driver: Driver,
    rng: np.random.Generator,
    sampling: Sampling,
) -> list[Atoms]:
    """Rattled (and strained) copies of ``start`` plus MD snapshots from it."""
    frames = []
    for k in range(sampling.rattled):
        atoms = start.copy()
        strain = _strain(atoms, rng, sampling.max_strain)
        std = _rattle(atoms, rng, sampling.rattle_std)
        label = f"{origin} rattle={std:.3f}" + (f" strain={strain:.3f}" if strain else "")
        frames.append(_tag(atoms, config_type, label, f"{origin}/rattle{k}"))
    for t in range(sampling.trajectories):
        atoms = start.copy()
        _strain(atoms, rng, sampling.max_strain)
        for snapshot, temperature in trajectory(atoms, driver, rng, sampling):
            label = f"{origin} md T={temperature:.0f}K"
            frames.append(_tag(snapshot, config_type, label, f"{origin}/md{t}"))
    return frames


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def molecules(
    driver: Driver, rng: np.random.Generator, sampling: Sampling, names: list[str] | None = None
) -> list[Atoms]:
    """Rattled molecules and MD snapshots, non-periodic, randomly oriented."""
    frames = []
    for name in names or organic_molecules():
        start = molecule(name)
        start.positions = (start.positions - start.get_center_of_mass()) @ _random_rotation(rng).T
        frames += perturbed(start, "molecule", f"molecule:{name}", driver, rng, sampling)
    return frames


def molecule_pairs(
    count: int, rng: np.random.Generator, names: list[str] | None = None
) -> list[Atoms]:
    """Two molecules at a random orientation, closest atoms 1.8-3.5 A apart (non-bonded)."""
    names = names or organic_molecules()
    frames = []
    for k in range(count):
        first, second = (str(n) for n in rng.choice(names, size=2))
        a, b = molecule(first), molecule(second)
        a.positions = (a.positions - a.get_center_of_mass()) @ _random_rotation(rng).T
        b.positions = (b.positions - b.get_center_of_mass()) @ _random_rotation(rng).T
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        gap = float(rng.uniform(1.8, 3.5))
        # slide b along the direction until its closest atom is ``gap`` away from a
        shift = 0.0
        for _ in range(200):
            moved = b.positions + shift * direction
            closest = np.min(np.linalg.norm(a.positions[:, None] - moved[None], axis=-1))
            if closest >= gap:
                break
            shift += 0.1
        pair = Atoms(
            list(a.numbers) + list(b.numbers),
            np.vstack([a.positions, b.positions + shift * direction]),
        )
        _rattle(pair, rng, (0.0, 0.05))
        origin = f"pair:{first}+{second} gap={gap:.2f}"
        frames.append(_tag(pair, "molecule_pair", origin, f"pair{k}"))
    return frames


def lattice_constant(symbol: str) -> float:
    return float(reference_states[atomic_numbers[symbol]]["a"])


def crystals(
    driver: Driver,
    rng: np.random.Generator,
    sampling: Sampling,
    metals: tuple[str, ...] = BULK_METALS,
    alloys: int = 8,
) -> list[Atoms]:
    """fcc metals and random binary alloys (8-atom cells, Vegard lattice constants)."""
    starts = [(m, [m]) for m in metals]
    for _ in range(alloys):
        pair = [str(s) for s in rng.choice(metals, size=2, replace=False)]
        starts.append(("".join(pair), pair))
    frames = []
    for name, pair in starts:
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        symbols = [str(s) for s in rng.choice(pair, size=len(atoms))] if len(pair) > 1 else pair
        atoms.set_chemical_symbols(symbols * (len(atoms) // len(symbols)))
        a = float(np.mean([lattice_constant(s) for s in atoms.get_chemical_symbols()]))
        atoms.set_cell(atoms.cell.array * a / 3.6, scale_atoms=True)
        frames += perturbed(atoms, "bulk", f"bulk:{name}", driver, rng, sampling)
    return frames


def adsorption_height(slab: Atoms, site_xy: np.ndarray, symbol: str) -> float:
    """Height above the top layer at which ``symbol`` is one bond length from the surface.

    The bond length is ``BOND_FACTOR`` times the sum of covalent radii; the lateral
    distance to the nearest top-layer atom (periodic images included) sets the height.
    """
    top = slab.positions[:, 2].max()
    layer = slab.positions[slab.positions[:, 2] > top - 0.5]
    cell = slab.cell.array[:2, :2]
    images = [i * cell[0] + j * cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    lateral = min(np.linalg.norm(site_xy - atom[:2] - shift) for atom in layer for shift in images)
    metal = slab.numbers[slab.positions[:, 2] > top - 0.5][0]
    bond = BOND_FACTOR * (covalent_radii[metal] + covalent_radii[atomic_numbers[symbol]])
    return float(np.sqrt(max(bond**2 - lateral**2, 0.5**2)))


def slab_with_adsorbate(metal: str, facet: str, adsorbate: str, site: str) -> Atoms:
    """A 2x2, three-layer fcc slab with 5 A of vacuum each side and one adsorbate."""
    build = fcc111 if facet == "111" else fcc100
    slab = build(metal, size=(2, 2, 3), a=lattice_constant(metal), vacuum=5.0)
    position = slab.info["adsorbate_info"]["sites"][site]
    top = slab.positions[:, 2].max()
    site_xy = position @ slab.info["adsorbate_info"]["cell"]
    height = adsorption_height(slab, site_xy, ADSORBATES[adsorbate][0][0])
    anchor = np.array([*site_xy, top + height])
    for symbol, offset in ADSORBATES[adsorbate]:
        slab += Atoms(symbol, [anchor + np.asarray(offset)])
    slab.info.pop("adsorbate_info", None)  # not representable in extxyz
    slab.set_cell(slab.cell.array + np.diag([0.0, 0.0, height + 2.0]))  # keep the vacuum
    return slab


def slabs(
    driver: Driver,
    rng: np.random.Generator,
    sampling: Sampling,
    count: int,
    metals: tuple[str, ...] = SLAB_METALS,
) -> list[Atoms]:
    """``count`` random (metal, facet, adsorbate, site) slabs, each rattled and run by MD."""
    frames = []
    for k in range(count):
        metal = str(rng.choice(metals))
        facet = str(rng.choice(["111", "100"]))
        adsorbate = str(rng.choice(list(ADSORBATES)))
        sites = (
            ("ontop", "bridge", "fcc", "hcp") if facet == "111" else ("ontop", "bridge", "hollow")
        )
        site = str(rng.choice(sites))
        start = slab_with_adsorbate(metal, facet, adsorbate, site)
        origin = f"slab:{metal}({facet})+{adsorbate}@{site}#{k}"
        frames += perturbed(start, "slab_adsorbate", origin, driver, rng, sampling)
    return frames
