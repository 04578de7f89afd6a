# ruff: noqa: I001  (mace must be imported before e3nn)
"""Write tests/data/mace_e3nn044.model and its reference outputs, under e3nn 0.4.4.

mace-torch pins e3nn 0.4.4, and whole-model pickles do not load across e3nn versions, so
users' files are written under 0.4.4 while Crossfield runs on e3nn 0.6. This script runs in
a separate environment (torch==2.13.0, e3nn==0.4.4, mace-torch==0.3.16) and records a small
random-weight MH-1-like model and its energies/forces/stress, which
tests/test_mace_e3nn044.py converts and compares under e3nn 0.6.

    python -m venv /tmp/venv044 && . /tmp/venv044/bin/activate
    pip install torch==2.13.0 && pip install e3nn==0.4.4 mace-torch==0.3.16
    python tests/data/make_e3nn044_reference.py
"""

import sys
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import e3nn
import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from mace_reference import evaluate_mace, make_mace_model  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

assert e3nn.__version__ == "0.4.4", e3nn.__version__
heads = ["pbe", "r2scan", "wb97m"]
model = make_mace_model(
    [1, 6, 8, 29],
    heads,
    seed=44,
    hidden="4x0e+4x1o",
    max_ell=2,
    first="nonlinear",
    interaction="nonlinear",
    agnostic=True,
    agnesi=True,
    zbl=True,
    apply_cutoff=False,
)
torch.save(model, HERE / "mace_e3nn044.model")
crystal = bulk("Cu", "fcc", a=3.65, cubic=True)
crystal.numbers[1] = 8
crystal.rattle(0.05, seed=1)
ethanol = molecule("CH3CH2OH")
ethanol.rattle(0.05, seed=2)
arrays = {}
for head in heads:
    for name, atoms in (("crystal", crystal), ("molecule", ethanol)):
        out, _ = evaluate_mace(model, [atoms], heads, [head], compute_stress=atoms.pbc.all())
        arrays[f"{name}_{head}_energy"] = out["energy"].numpy()
        arrays[f"{name}_{head}_forces"] = out["forces"].numpy()
        if "stress" in out and atoms.pbc.all():
            arrays[f"{name}_{head}_stress"] = out["stress"].numpy()
for name, atoms in (("crystal", crystal), ("molecule", ethanol)):
    arrays[f"{name}_numbers"] = atoms.numbers
    arrays[f"{name}_positions"] = atoms.positions
    arrays[f"{name}_cell"] = atoms.cell.array
    arrays[f"{name}_pbc"] = atoms.pbc
np.savez_compressed(HERE / "mace_e3nn044_reference.npz", **arrays)
print("wrote", HERE / "mace_e3nn044.model", (HERE / "mace_e3nn044.model").stat().st_size, "bytes")
