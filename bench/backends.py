"""Inference backends side by side: time per batch against eager and mace-torch eager.

    python bench/backends.py --threads 1 [--channels 64] [--repeats 5]
        [--backends eager,compile,script] [--dtypes float32,float64]
        [--bucket-workloads molecules_32] [--cache-dir DIR]
        [--json docs/backends.json] [--png docs/backends.png]

One MH-1-like model (non-linear blocks, element-agnostic product, Agnesi transform, ZBL)
with random weights, built in mace-torch and converted, so every backend and mace-torch
run the same function. Workloads: a 64-atom and a 512-atom Cu crystal (energy, forces,
stress) and 32 small molecules (energy, forces). Per backend and precision it records the
warm-up time (compilation, from an empty or a warm cache: say which), then per workload
the first call after warm-up (> the steady time only if that call compiled) and the median
of ``--repeats`` steady calls, interleaved with eager and mace-torch so all three see the
same machine load. ``compile:buckets`` is torch.compile with static shapes padded to size
buckets, the alternative to dynamic shapes; it compiles per bucket, so by default it runs
on the molecules in float32 only. Graph construction is excluded: this measures the model.

Ratios are ``eager / backend`` and ``mace / backend`` (> 1: the backend is faster). The
float32 force error is max |F32 - F64_eager| over the workload, against the float64
eager forces of the same model. Pin threads (``--threads 1``) on a shared machine:
contention distorts timings far more than any backend changes them.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mace_reference import make_mace_model  # noqa: E402
from model_speed import mace_batch  # noqa: E402

from crossfield.model import Structure, build_batch  # noqa: E402
from crossfield.model.backends import compile_model  # noqa: E402
from crossfield.model.mace_import import convert_mace  # noqa: E402

ELEMENTS = [1, 6, 7, 8, 29]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def workloads() -> dict[str, tuple[list, bool]]:
    """name -> (ase.Atoms list, periodic: compute stress)."""
    small = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 4)
    small.rattle(0.05, seed=1)
    large = bulk("Cu", "fcc", a=3.61, cubic=True) * (4, 4, 8)
    large.rattle(0.05, seed=2)
    names = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4"]
    molecules = [molecule(names[i % len(names)]) for i in range(32)]
    for index, m in enumerate(molecules):
        m.rattle(0.02, seed=index)
    return {
        "crystal_64": ([small], True),
        "crystal_512": ([large], True),
        "molecules_32": (molecules, False),
    }


def reference_model(channels: int, dtype: torch.dtype) -> torch.nn.Module:
    return make_mace_model(
        ELEMENTS,
        ["Default"],
        dtype=dtype,
        hidden=f"{channels}x0e+{channels}x1o",
        first="nonlinear",
        interaction="nonlinear",
        agnostic=True,
        agnesi=True,
        zbl=True,
        apply_cutoff=False,
        r_max=5.0,
        radial_mlp=(64, 64, 64),
        mlp_irreps="16x0e",
    )


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(compiled, eager, reference, graph, theirs, periodic: bool, repeats: int) -> dict:
    """First call after warm-up, then medians of interleaved steady calls (ms)."""

    def call_backend():
        compiled(graph, compute_forces=True, compute_stress=periodic)

    def call_eager():
        eager(graph, compute_forces=True, compute_stress=periodic)

    def call_mace():
        data = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in theirs.items()}
        reference(data, compute_stress=periodic, training=False)

    first_call_s = seconds(call_backend)
    call_eager()
    call_mace()
    times = {"backend": [], "eager": [], "mace": []}
    for _ in range(repeats):
        times["backend"].append(seconds(call_backend))
        times["eager"].append(seconds(call_eager))
        times["mace"].append(seconds(call_mace))
    return {
        "first_call_s": first_call_s,
        **{f"{name}_ms": 1e3 * statistics.median(values) for name, values in times.items()},
    }


def run(args: argparse.Namespace, save) -> dict:
    """Every measurement as a row of the result; ``save(result)`` after each row."""
    torch.set_num_threads(args.threads)
    rows = []
    result = {
        "machine": {
            "threads": args.threads,
            "torch": torch.__version__,
            "device": "cpu",
            "cache": "warm" if args.warm_cache else "cold",
        },
        "model": {"architecture": "mh1_nonlinear_agnostic", "channels": args.channels},
        "rows": rows,
    }
    work = workloads()
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        reference = reference_model(args.channels, dtype)
        ours = convert_mace(reference, dtype=dtype)
        exact = convert_mace(reference, dtype=torch.float64)  # the same weights, in float64
        for backend in args.backends:
            name, _, shapes = backend.partition(":")
            if shapes == "buckets" and dtype_name not in args.bucket_dtypes:
                continue
            compiled = compile_model(
                ours, name, dtype, "cpu", args.cache_dir, shapes=shapes or "dynamic"
            )
            start = time.perf_counter()
            if shapes == "buckets":  # compiles per bucket: warm up the molecules' bucket only
                molecules = [Structure.from_atoms(a) for a in work["molecules_32"][0]]
                config = ours.config
                example = build_batch(molecules, ELEMENTS, config.r_max, config.head_names, dtype)
                compiled.warm_up([example], property_sets=[(True, False)])
            else:
                compiled.warm_up(property_sets=[(True, False), (True, True)])
            warm_up_s = time.perf_counter() - start
            graphs_after_warm_up = compiled.compilations
            print(f"{dtype_name} {backend}: warm-up {warm_up_s:.1f} s", flush=True)
            for workload, (atoms_list, periodic) in work.items():
                if shapes == "buckets" and workload not in args.bucket_workloads:
                    continue
                structures = [Structure.from_atoms(a) for a in atoms_list]
                config = ours.config
                graph = build_batch(
                    structures, config.elements, config.r_max, config.head_names, dtype
                )
                graph64 = build_batch(
                    structures, config.elements, config.r_max, config.head_names, torch.float64
                )
                theirs = mace_batch(reference, atoms_list, dtype)

                timings = measure(compiled, ours, reference, graph, theirs, periodic, args.repeats)
                forces = compiled(graph, compute_forces=True)["forces"].double()
                exact_forces = exact(graph64, compute_forces=True)["forces"]
                row = {
                    "backend": backend,
                    "dtype": dtype_name,
                    "workload": workload,
                    "atoms": graph.num_atoms,
                    "edges": graph.num_edges,
                    "warm_up_s": warm_up_s,
                    **timings,
                    "max_force_error_vs_float64": (forces - exact_forces).abs().max().item(),
                    "max_force": exact_forces.abs().max().item(),
                    "recompilations_after_warm_up": compiled.compilations - graphs_after_warm_up,
                }
                row["speedup_vs_eager"] = row["eager_ms"] / row["backend_ms"]
                row["speedup_vs_mace"] = row["mace_ms"] / row["backend_ms"]
                rows.append(row)
                save(result)
                print(
                    f"  {workload:13s} atoms {row['atoms']:4d}  first {row['first_call_s']:7.2f} s"
                    f"  {row['backend_ms']:9.1f} ms  eager {row['eager_ms']:9.1f} ms"
                    f"  mace {row['mace_ms']:9.1f} ms  x{row['speedup_vs_eager']:.2f} eager"
                    f"  x{row['speedup_vs_mace']:.2f} mace"
                    f"  |dF| {row['max_force_error_vs_float64']:.1e}"
                    f"  recompiles {row['recompilations_after_warm_up']}",
                    flush=True,
                )
    return result


COLOURS = {
    "mace-torch": "tab:blue",
    "eager": "tab:orange",
    "compile": "tab:green",
    "script": "tab:red",
    "compile:buckets": "tab:purple",
}


def chart(result: dict, path: Path) -> None:
    """Speed-up over eager per workload, one panel per precision; mace-torch for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dtypes = sorted({r["dtype"] for r in rows})
    workloads_ = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        backends = list(dict.fromkeys(r["backend"] for r in rows if r["dtype"] == dtype))
        series = ["mace-torch", *backends]
        width = 0.8 / len(series)
        for k, label in enumerate(series):
            heights, positions = [], []
            for w, workload in enumerate(workloads_):
                match = [r for r in rows if r["dtype"] == dtype and r["workload"] == workload]
                if label == "mace-torch" and match:
                    heights.append(statistics.median(r["eager_ms"] / r["mace_ms"] for r in match))
                    positions.append(w)
                for r in match:
                    if r["backend"] == label:
                        heights.append(r["speedup_vs_eager"])
                        positions.append(w)
            bars = axis.bar(
                [p + k * width for p in positions],
                heights,
                width,
                label=label,
                color=COLOURS.get(label),
            )
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads_))], workloads_)
        axis.set_ylim(0, 1.25 * max(r["speedup_vs_eager"] for r in rows))
        axis.set_ylabel("speed-up over the Crossfield module (eager)")
        axis.set_title(f"{dtype}, CPU, {result['machine']['threads']} thread(s)")
        axis.legend(fontsize=8, loc="upper left", ncols=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", default="eager,compile,script,compile:buckets")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--bucket-workloads", default="molecules_32")
    parser.add_argument("--bucket-dtypes", default="float32")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--warm-cache", action="store_true", help="label: cache was warm")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument(
        "--chart-from", type=Path, metavar="JSON", help="only draw --png from an earlier --json"
    )
    args = parser.parse_args()
    if args.chart_from:
        chart(json.loads(args.chart_from.read_text()), args.png)
        return
    args.backends = args.backends.split(",")
    args.dtypes = args.dtypes.split(",")
    args.bucket_workloads = args.bucket_workloads.split(",")
    args.bucket_dtypes = args.bucket_dtypes.split(",")

    def save(result: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    result = run(args, save)
    if args.png:
        chart(result, args.png)


if __name__ == "__main__":
    main()
