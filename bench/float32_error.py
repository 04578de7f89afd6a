"""float32 against float64, per backend, for the shipped trained model on real forces.

    python bench/float32_error.py [--backends eager,script] [--cache-dir DIR]
        [--json docs/float32_error.json]

Random-weight models (bench/backends.py) have forces of a few meV/A, which says little
about the error at the force scale of a simulation. This runs the shipped default model
(``crossfield.model.presets.default_model``) in float64 eager and in float32 under each
backend over the shipped test sets (forces up to ~18 eV/A) and reports the largest and
RMS force deviation and the largest energy deviation per atom. ``compile`` is left out by
default because it compiles for minutes on a small CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.io
import numpy as np
import torch

from crossfield.model import Structure, evaluate
from crossfield.model.backends import compile_model
from crossfield.model.presets import default_model

DATA = Path(__file__).resolve().parent.parent / "data"
SETS = {
    "molecules_gfn2": "gfn2_xtb",
    "molecules_surfaces_gfn1": "gfn1_xtb",
    "metals_surfaces_emt": "emt",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="eager,script")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    exact = default_model(torch.float64)
    rows = []
    for backend in args.backends.split(","):
        model = compile_model(
            default_model(torch.float32), backend, torch.float32, "cpu", args.cache_dir
        )
        model.warm_up()
        for name, head in SETS.items():
            structures = [
                Structure.from_atoms(atoms, head=head)
                for atoms in ase.io.read(DATA / name / "test.extxyz.gz", ":")
            ]
            want, got = evaluate(exact, structures), evaluate(model, structures)
            reference = np.concatenate([r["forces"] for r in want])
            error = np.concatenate([r["forces"] for r in got]) - reference
            energy = max(
                abs(g["energy"] - w["energy"]) / len(s.numbers)
                for g, w, s in zip(got, want, structures)
            )
            row = {
                "backend": backend,
                "data": name,
                "structures": len(structures),
                "max_force": float(np.abs(reference).max()),
                "max_force_error": float(np.abs(error).max()),
                "rms_force_error": float(np.sqrt((error**2).mean())),
                "max_energy_error_per_atom": float(energy),
            }
            rows.append(row)
            print(
                f"{backend:8s} {name:24s} max|F| {row['max_force']:6.2f} eV/A  "
                f"max dF {row['max_force_error']:.1e}  rms dF {row['rms_force_error']:.1e} eV/A  "
                f"max dE {row['max_energy_error_per_atom']:.1e} eV/atom",
                flush=True,
            )
    if args.json:
        result = {"torch": torch.__version__, "threads": args.threads, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
