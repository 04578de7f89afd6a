"""Crossfield vs mace-torch, eager, the same weights: time per energy+forces(+stress) call.

    python bench/model_speed.py [--channels 64] [--repeats 5] [--json out.json]

For each architecture (MP-0-like residual, MH-1-like non-linear agnostic), precision and
workload (a 64-atom crystal; a batch of 32 small molecules) it times both models on the
same graph, interleaved, and prints the ratio Crossfield / mace-torch (< 1: we are faster).
Graph construction is excluded on both sides: this measures the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import torch
from ase.build import bulk, molecule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mace import data as mace_data  # noqa: E402
from mace.tools import torch_geometric, utils  # noqa: E402
from mace_reference import make_mace_model  # noqa: E402

from crossfield.model import Structure, build_batch  # noqa: E402
from crossfield.model.mace_import import convert_mace  # noqa: E402

ELEMENTS = [1, 6, 7, 8, 29]


def workloads():
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 4)
    crystal.rattle(0.05, seed=1)
    names = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4"]
    molecules = [molecule(names[i % len(names)]) for i in range(32)]
    for index, m in enumerate(molecules):
        m.rattle(0.02, seed=index)
    return {"crystal_64": ([crystal], True), "molecules_32": (molecules, False)}


def mace_batch(model, atoms_list, dtype):
    z_table = utils.AtomicNumberTable(ELEMENTS)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data = [
            mace_data.AtomicData.from_config(
                mace_data.config_from_atoms(a, head_name="Default"),
                z_table=z_table,
                cutoff=float(model.r_max),
            )
            for a in atoms_list
        ]
    finally:
        torch.set_default_dtype(previous)
    batch = next(iter(torch_geometric.dataloader.DataLoader(data, batch_size=len(data)))).to_dict()
    return batch


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def measure(reference, ours, batch_theirs, batch_ours, periodic: bool, repeats: int):
    """Per-call times of both models on the same graph, interleaved so both see the same load."""

    def theirs():
        data = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch_theirs.items()}
        reference(data, compute_stress=periodic, training=False)

    def ours_call():
        ours(batch_ours, compute_forces=True, compute_stress=periodic)

    theirs()  # warm-up (allocator, first-call paths)
    ours_call()
    t_theirs, t_ours = [], []
    for _ in range(repeats):
        t_theirs += timed(theirs, 1)
        t_ours += timed(ours_call, 1)
    return t_theirs, t_ours


def run(channels: int, repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    architectures = {
        "mp0_residual": dict(
            hidden=f"{channels}x0e+{channels}x1o",
            first="residual",
            interaction="residual",
            r_max=5.0,
        ),
        "mh1_nonlinear": dict(
            hidden=f"{channels}x0e+{channels}x1o",
            first="nonlinear",
            interaction="nonlinear",
            agnostic=True,
            agnesi=True,
            zbl=True,
            apply_cutoff=False,
            r_max=5.0,
        ),
    }
    rows = []
    for arch, options in architectures.items():
        for dtype in (torch.float32, torch.float64):
            reference = make_mace_model(
                ELEMENTS, ["Default"], dtype=dtype, radial_mlp=(64, 64, 64), **options
            )
            ours = convert_mace(reference, dtype=dtype)
            for workload, (atoms_list, periodic) in workloads().items():
                batch_theirs = mace_batch(reference, atoms_list, dtype)
                structures = [Structure.from_atoms(a) for a in atoms_list]
                batch_ours = build_batch(
                    structures, ELEMENTS, ours.config.r_max, ours.config.head_names, dtype
                )

                t_theirs, t_ours = measure(
                    reference, ours, batch_theirs, batch_ours, periodic, repeats
                )
                row = {
                    "architecture": arch,
                    "dtype": str(dtype).removeprefix("torch."),
                    "workload": workload,
                    "atoms": batch_ours.num_atoms,
                    "edges": batch_ours.num_edges,
                    "mace_ms": 1e3 * statistics.median(t_theirs),
                    "crossfield_ms": 1e3 * statistics.median(t_ours),
                }
                row["ratio"] = row["crossfield_ms"] / row["mace_ms"]
                rows.append(row)
                print(
                    f"{arch:14s} {row['dtype']:8s} {workload:13s} atoms {row['atoms']:4d} "
                    f"mace {row['mace_ms']:8.1f} ms  crossfield {row['crossfield_ms']:8.1f} ms  "
                    f"ratio {row['ratio']:.2f}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = run(args.channels, args.repeats, args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
