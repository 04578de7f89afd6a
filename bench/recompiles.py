"""A long run of varying batches through a compiled model: does anything recompile?

    python bench/recompiles.py --threads 1 [--batches 300] [--backend compile]
        [--product agnostic|element] [--channels 16] [--dtype float64]
        [--cache-dir DIR] [--json docs/recompiles.json]

A random-weight MH-1-like model (``--product agnostic``) or an MP-0-like one with
per-element product weights (``--product element``, whose product runs eagerly between
compiled pieces) is compiled and warmed up as the server does it, then fed ``--batches``
batches such as a server forms them: 1 to 40 structures drawn from molecules, slabs and
crystals of many sizes and compositions, asking for energies alone, forces, or forces and
stress at random. It prints the graphs compiled during warm-up and after it (the aim: none
after), dynamo's unique-graph counter, the largest deviation from eager, and the total time
of the run against eager on the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from torch._dynamo.utils import counters
from tqdm import tqdm

from crossfield.model import Structure, build_batch, build_model
from crossfield.model.backends import compile_model
from crossfield.model.presets import mh1_config, mp0_config

ELEMENTS = [1, 6, 7, 8, 13, 29]
MOLECULES = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4", "C6H6", "CH3CHO"]


def random_structure(rng: np.random.Generator, heads: list[str]) -> tuple[Structure, bool]:
    """A molecule, a slab or a crystal of random size; True when it is periodic."""
    kind = rng.choice(["molecule", "molecule", "slab", "crystal"])
    if kind == "molecule":
        atoms = molecule(str(rng.choice(MOLECULES)))
    elif kind == "slab":
        atoms = fcc111("Cu", size=(2, 2, int(rng.integers(2, 5))), vacuum=5.0)
        atoms += Atoms("CO", positions=atoms.positions[-1] + [[0, 0, 1.9], [0, 0, 3.05]])
    else:
        element = str(rng.choice(["Cu", "Al"]))
        atoms = bulk(element, "fcc", a=3.61 if element == "Cu" else 4.05, cubic=True)
        atoms = atoms.repeat(tuple(int(n) for n in rng.integers(1, 3, size=3)))
        atoms.numbers[rng.random(len(atoms)) < 0.3] = 13 if element == "Cu" else 29
    atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
    head = heads[int(rng.integers(len(heads)))]
    return Structure.from_atoms(atoms, head=head), bool(atoms.pbc.any())


def largest_relative_error(got: dict, want: dict) -> float:
    worst = 0.0
    for name, value in want.items():
        scale = max(value.abs().max().item(), 1e-12) if value.numel() else 1.0
        worst = max(worst, (got[name] - value).abs().max().item() / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--backend", default="compile", choices=("compile", "script"))
    parser.add_argument("--product", default="agnostic", choices=("agnostic", "element"))
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    make_config = mh1_config if args.product == "agnostic" else mp0_config
    config = make_config(ELEMENTS, channels=args.channels, r_max=5.0)
    if args.product == "element":
        config.heads = mh1_config(ELEMENTS).heads  # several heads in every batch
    model = build_model(config, seed=args.seed, dtype=dtype).eval()
    heads = config.head_names

    start = time.perf_counter()
    compiled = compile_model(model, args.backend, dtype, "cpu", args.cache_dir)
    warm = compiled.warm_up()
    warm_up_s = time.perf_counter() - start
    graphs_after_warm_up = compiled.compilations
    unique_after_warm_up = counters["stats"]["unique_graphs"]
    print(f"warm-up {warm_up_s:.1f} s, {graphs_after_warm_up} graphs", flush=True)

    rng = np.random.default_rng(args.seed)
    worst, seen_atoms, seen_sizes = 0.0, set(), set()
    compiled_s = eager_s = 0.0
    for _ in tqdm(range(args.batches), desc="batches", unit="batch"):
        drawn = [random_structure(rng, heads) for _ in range(int(rng.integers(1, 41)))]
        structures = [s for s, _ in drawn]
        forces = bool(rng.random() < 0.8)
        stress = forces and any(periodic for _, periodic in drawn) and bool(rng.random() < 0.5)
        batch = build_batch(structures, config.elements, config.r_max, heads, dtype)
        seen_atoms.add(batch.num_atoms)
        seen_sizes.add((batch.num_atoms, batch.num_edges, batch.num_structures))
        with torch.set_grad_enabled(forces):
            tick = time.perf_counter()
            got = compiled(batch, compute_forces=forces, compute_stress=stress)
            compiled_s += time.perf_counter() - tick
            tick = time.perf_counter()
            want = model(batch, compute_forces=forces, compute_stress=stress)
            eager_s += time.perf_counter() - tick
        worst = max(worst, largest_relative_error(got, {k: v.detach() for k, v in want.items()}))

    result = {
        "backend": args.backend,
        "product": args.product,
        "channels": args.channels,
        "dtype": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "batches": args.batches,
        "distinct_batch_shapes": len(seen_sizes),
        "atom_counts": [min(seen_atoms), max(seen_atoms)],
        "warm_up_s": warm_up_s,
        "graphs_compiled_in_warm_up": graphs_after_warm_up,
        "graphs_compiled_after_warm_up": compiled.compilations - graphs_after_warm_up,
        "dynamo_unique_graphs_after_warm_up": counters["stats"]["unique_graphs"]
        - unique_after_warm_up,
        "max_relative_error_vs_eager": worst,
        "warm_up_max_force_error": warm.max_force_error,
        "speedup_vs_eager": eager_s / compiled_s,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["graphs_compiled_after_warm_up"]:
        sys.exit("recompilations after warm-up: see above")


if __name__ == "__main__":
    main()
