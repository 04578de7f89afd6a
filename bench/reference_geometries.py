"""Relaxed geometries of the default model against its heads' own levels of theory.

    python bench/reference_geometries.py [--out docs/default_model_geometry.json]

- Molecules relaxed (BFGS, fmax 1e-3 eV/A) with the model on ``gfn2_xtb`` and on
  ``gfn1_xtb``, and with GFN2-xTB / GFN1-xTB themselves (tblite): every bond length
  (pairs within 1.3 x the covalent radii sum) and every angle between two bonds at one
  atom, compared.
- fcc lattice constants of Al, Ni, Cu, Pd, Ag, Pt, Au on ``emt`` against ASE's EMT
  (energy minimised over the cubic lattice constant of the primitive cell).

``tests/test_default_model.py`` checks a subset with the same functions; this script
writes the full table that the README quotes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.data import covalent_radii
from ase.optimize import BFGS
from scipy.optimize import minimize_scalar

MOLECULES = ("H2O", "NH3", "CH4", "CO2", "HCN", "C2H2", "C2H4", "H2CO", "CH3OH", "HCOOH")
METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
LEVELS = {"gfn2_xtb": "GFN2-xTB", "gfn1_xtb": "GFN1-xTB"}
FMAX = 1e-3  # eV/A: bond lengths converge to ~FMAX / k ~ 1e-4 A for k ~ 10 eV/A^2


def tblite(method: str):
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0)


def model_calculator(head: str):
    import torch

    from crossfield.model.calculator import CrossfieldCalculator
    from crossfield.model.presets import default_model

    return CrossfieldCalculator(default_model(torch.float64), head=head, dtype=torch.float64)


def relaxed(atoms: Atoms, calculator, steps: int = 500) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = calculator
    BFGS(atoms, logfile=None).run(fmax=FMAX, steps=steps)
    return atoms


def bonds(atoms: Atoms) -> list[tuple[int, int]]:
    """Pairs closer than 1.3 x their covalent radii sum (in the reference geometry)."""
    radii = covalent_radii[atoms.numbers]
    distances = atoms.get_all_distances()
    n = len(atoms)
    return [
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if distances[i, j] < 1.3 * (radii[i] + radii[j])
    ]


def angles(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Every angle a-c-b between two bonds that share atom c."""
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs:
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    return [
        (a, centre, b)
        for centre, around in neighbours.items()
        for k, a in enumerate(around)
        for b in around[k + 1 :]
    ]


def geometry_errors(model: Atoms, reference: Atoms) -> dict[str, float]:
    """Largest bond-length (A) and angle (degrees) differences, bonds from ``reference``."""
    pairs = bonds(reference)
    bond_error = max(abs(model.get_distance(i, j) - reference.get_distance(i, j)) for i, j in pairs)
    triples = angles(pairs)
    angle_error = max(
        (abs(model.get_angle(*t) - reference.get_angle(*t)) for t in triples), default=0.0
    )
    return {"bond_a": float(bond_error), "angle_deg": float(angle_error)}


def compare_molecule(name: str, head: str, model_calc=None) -> dict[str, float]:
    start = molecule(name)
    reference = relaxed(start, tblite(LEVELS[head]))
    ours = relaxed(start, model_calc or model_calculator(head))
    return geometry_errors(ours, reference)


def lattice_constant(symbol: str, calculator: Callable[[], object]) -> float:
    """The cubic fcc lattice constant (A) minimising the energy of the primitive cell."""

    def energy(a: float) -> float:
        atoms = bulk(symbol, "fcc", a=a)
        atoms.calc = calculator()
        return atoms.get_potential_energy()

    guess = bulk(symbol, "fcc").cell.cellpar()[0] * np.sqrt(2)
    result = minimize_scalar(
        energy, bounds=(0.85 * guess, 1.15 * guess), method="bounded", options={"xatol": 1e-5}
    )
    return float(result.x)


def compare_metal(symbol: str, model_calc=None) -> dict[str, float]:
    from ase.calculators.emt import EMT

    reference = lattice_constant(symbol, EMT)
    calc = model_calc or model_calculator("emt")
    ours = lattice_constant(symbol, lambda: calc)
    return {"model_a": ours, "emt_a": reference, "relative": (ours - reference) / reference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/default_model_geometry.json"))
    args = parser.parse_args(argv)
    report: dict[str, dict] = {"molecules": {}, "metals": {}}
    for head in LEVELS:
        calc = model_calculator(head)
        for name in MOLECULES:
            errors = compare_molecule(name, head, calc)
            report["molecules"][f"{head}/{name}"] = errors
            print(
                f"{head:9s} {name:7s} bond {errors['bond_a']:.4f} A, "
                f"angle {errors['angle_deg']:.2f} deg",
                flush=True,
            )
    calc = model_calculator("emt")
    for symbol in METALS:
        row = compare_metal(symbol, calc)
        report["metals"][symbol] = row
        print(
            f"emt       {symbol:7s} a {row['model_a']:.4f} A vs EMT {row['emt_a']:.4f} A "
            f"({100 * row['relative']:+.2f} %)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
