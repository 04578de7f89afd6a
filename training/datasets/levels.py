"""The levels of theory that label the data, and what each label honestly is.

Every label is produced by a method that installs from PyPI and runs offline in
milliseconds to seconds per structure on one CPU core:

- GFN2-xTB and GFN1-xTB (tblite): semi-empirical density-functional *tight binding*,
  parametrised against DFT for the whole periodic table up to radon. Two distinct
  Hamiltonians (GFN2 adds multipole electrostatics, GFN1 has halogen-bond and different
  repulsion terms), hence two levels of theory on the same geometries. For periodic cells
  tblite samples only the Gamma point, which is poor for small metallic cells: the data
  sets use it for molecules and slabs, not for bulk metals.
- EMT (ASE): effective-medium theory, a many-body classical potential for fcc metals
  (Al, Ni, Cu, Pd, Ag, Pt, Au) with rough H/C/N/O parameters meant for adsorbates on them.
  Not electronic-structure theory at all; a third, cheap and deterministic level.

A label is the total energy (eV), forces (eV/A) and, for cells periodic in all three
directions, the stress (eV/A^3, ASE sign convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.calculators.singlepoint import SinglePointCalculator


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class LevelOfTheory:
    """One labelling method: the head name it trains, its code and what kind of label it is."""

    name: str
    method: str
    kind: str
    package: str
    licence: str
    settings: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    def calculator(self) -> Calculator:
        if self.package == "tblite":
            try:
                from tblite.ase import TBLite
            except ImportError as err:
                raise RuntimeError(
                    f"level {self.name!r} needs tblite: pip install 'crossfield[data]'"
                ) from err
            return TBLite(method=self.method, verbosity=0, **self.settings)
        if self.package == "ase":
            from ase.calculators.emt import EMT

            return EMT()
        raise ValueError(f"level {self.name!r}: unknown package {self.package!r}")

    def metadata(self) -> dict[str, Any]:
        """The head's ``level_of_theory`` entry: enough to know what the numbers mean."""
        return {
            "method": self.method,
            "kind": self.kind,
            "code": f"{self.package} {_version(self.package)}",
            "licence": self.licence,
            **({"settings": dict(self.settings)} if self.settings else {}),
        }


LEVELS: dict[str, LevelOfTheory] = {
    level.name: level
    for level in (
        LevelOfTheory(
            name="gfn2_xtb",
            method="GFN2-xTB",
            kind="semi-empirical tight binding (DFTB-like, parametrised on DFT)",
            package="tblite",
            licence="tblite: LGPL-3.0-or-later; GFN2-xTB parameters published by Bannwarth, "
            "Ehlert, Grimme, JCTC 15, 1652 (2019)",
            settings={"electronic_temperature": 300.0, "max_iterations": 250},
            notes="closed-shell neutral molecules; includes GFN2's D4 dispersion",
        ),
        LevelOfTheory(
            name="gfn1_xtb",
            method="GFN1-xTB",
            kind="semi-empirical tight binding (DFTB-like, parametrised on DFT)",
            package="tblite",
            licence="tblite: LGPL-3.0-or-later; GFN1-xTB parameters published by Grimme, "
            "Bannwarth, Shushkov, JCTC 13, 1989 (2017)",
            settings={"electronic_temperature": 300.0, "max_iterations": 250},
            notes="includes D3 dispersion; slabs are periodic in two directions and sampled "
            "at the Gamma point only",
        ),
        LevelOfTheory(
            name="emt",
            method="EMT",
            kind="effective-medium theory (classical many-body potential, not electronic "
            "structure)",
            package="ase",
            licence="ASE: LGPL-2.1-or-later; EMT parameters of Jacobsen, Stoltze, Norskov, "
            "Surf. Sci. 366, 394 (1996); H/C/N/O parameters are rough (ASE documentation)",
            notes="metals Al Ni Cu Pd Ag Pt Au; H/C/N/O only as adsorbates",
        ),
    )
}


def get_level(name: str) -> LevelOfTheory:
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(f"level of theory {name!r}: choose one of {sorted(LEVELS)}") from None


def label(atoms: Atoms, calculator: Calculator) -> Atoms | None:
    """A bare copy of ``atoms`` carrying energy, forces (and stress) as a single-point result.

    Returns None when the method fails (an SCF that does not converge): a configuration
    the method cannot label has no place in its data set.
    """
    # positions and cell only: no stray per-atom arrays (tags, magnetic moments) in the files
    labelled = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    labelled.calc = calculator
    try:
        results = {
            "energy": float(labelled.get_potential_energy()),
            "forces": np.array(labelled.get_forces()),
        }
        if all(labelled.pbc):
            results["stress"] = np.array(labelled.get_stress())
    except CalculationFailed:
        return None
    if not np.isfinite(results["energy"]) or not np.all(np.isfinite(results["forces"])):
        return None
    labelled.calc = SinglePointCalculator(labelled, **results)
    return labelled
