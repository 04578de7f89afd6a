"""GPU throughput, same weights, one run: our backends against mace-torch (issue 17).

    python bench/gpu_bench.py --json OUT/gpu_bench.json --png OUT/gpu_bench.png
        [--budget-s 240] [--device cuda] [--channels 128] [--sizes 1000,10000,50000]
        [--molecules 256] [--repeats 5] [--models mp0_medium,mh1_like]
        [--backends eager,cueq,compile,aot] [--cache-dir DIR]

Two models with random weights, built in mace-torch and converted (so both codes compute
the same function): ``mp0_medium`` (MP-0 medium's size: 128x0e+128x1o, max_ell 3,
correlation 3, 2 layers, residual blocks, per-element product) and ``mh1_like`` (the same
size with MH-1's non-linear blocks and element-agnostic product). Workloads: fcc Cu
crystals of about 1k, 10k and 50k atoms, and a batch of small molecules. Each
measurement is energy + forces (+ stress for crystals), float32, the median of
``--repeats`` calls after a warm-up, with the device synchronised; reported as atoms/s
and us/atom/step. Graph building is excluded (timed once separately: vesin-torch on the
device for the largest crystal that fits).

Backends: ours eager, cueq (cuEquivariance kernels), compile (torch.compile, dynamic
shapes) and aot (AOTInductor package); mace-torch eager and mace-torch with
cuEquivariance (``mace.cli.convert_e3nn_cueq``). Compiling costs minutes, so the cheap
rows run first and each later one only while ``--budget-s`` lasts; what was skipped is
recorded as skipped, and what ran out of memory as out_of_memory. The same script runs
on the CPU with small sizes (``--device cpu --channels 16 --sizes 64,256``): that is how
it is tested here, where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mace  # noqa: F401  (before e3nn, as in bench/backends.py)
import torch
from ase.build import bulk, molecule

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mace_reference import make_mace_model  # noqa: E402
from model_speed import mace_batch  # noqa: E402

from crossfield.model import Structure, build_batch  # noqa: E402
from crossfield.model.backends import BackendUnavailableError, compile_model  # noqa: E402
from crossfield.model.device_graph import build_batch_on_device  # noqa: E402
from crossfield.model.mace_import import convert_mace  # noqa: E402

ELEMENTS = [1, 6, 7, 8, 29]  # model_speed.mace_batch builds its table from the same list
MOLECULES = ["H2O", "CH4", "NH3", "CH3OH", "C2H6", "HCN", "CO2", "C2H4", "CH3CH2OH"]


def mace_model(name: str, channels: int) -> torch.nn.Module:
    common = dict(hidden=f"{channels}x0e+{channels}x1o", max_ell=3, correlation=3, r_max=5.0)
    if name == "mp0_medium":
        return make_mace_model(
            ELEMENTS, ["Default"], first="plain", interaction="residual", dtype=torch.float32,
            radial_mlp=(64, 64, 64), **common,
        )  # fmt: skip
    return make_mace_model(
        ELEMENTS, ["Default"], first="nonlinear", interaction="nonlinear", agnostic=True,
        agnesi=True, zbl=True, apply_cutoff=False, radial_mlp=(64, 64, 64),
        mlp_irreps="16x0e", dtype=torch.float32, **common,
    )  # fmt: skip


def workloads(sizes: list[int], molecules: int) -> dict[str, tuple[list, bool]]:
    """name -> (ase.Atoms list, periodic). Crystals: cubic fcc cells, 4 atoms each."""
    result = {}
    for size in sizes:
        side = max(1, round((size / 4) ** (1 / 3)))
        crystal = bulk("Cu", "fcc", a=3.61, cubic=True) * (side, side, side)
        crystal.rattle(0.05, seed=size)
        result[f"crystal_{len(crystal)}"] = ([crystal], True)
    batch = [molecule(MOLECULES[i % len(MOLECULES)]) for i in range(molecules)]
    for index, m in enumerate(batch):
        m.rattle(0.02, seed=index)
    result[f"molecules_{molecules}"] = (batch, False)
    return result


def timed(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one untimed call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mace_cueq(reference: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from mace.cli.convert_e3nn_cueq import run as convert

    return convert(reference, device=device.type, return_model=True)


def our_backend(model, backend: str, device: torch.device, cache: Path | None, graph):
    if backend == "eager":
        return model
    compiled = compile_model(model, backend, torch.float32, device, cache)
    compiled.warm_up([graph], property_sets=[(True, True)])
    return compiled


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    result: dict = {"device": _device_name(device), "torch": torch.__version__, "rows": []}
    loads = workloads(args.sizes, args.molecules)
    for model_name in args.models:
        run_model(args, model_name, loads, device, deadline, result, save)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def run_model(args, model_name: str, loads: dict, device, deadline: float, result, save) -> None:
    """Every backend of one model on every workload, appended to ``result["rows"]``."""
    reference = mace_model(model_name, args.channels).to(device)
    ours = convert_mace(reference, dtype=torch.float32).to(device).eval()
    ours.requires_grad_(False)
    config = ours.config
    graphs, theirs = {}, {}
    for name, (atoms, _) in loads.items():
        structures = [Structure.from_atoms(a) for a in atoms]
        graphs[name] = build_batch(
            structures, config.elements, config.r_max, config.head_names, torch.float32, device
        )
        batch = mace_batch(reference, atoms, torch.float32)
        theirs[name] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def record(backend: str, name: str, **fields) -> None:
        atoms = graphs[name].num_atoms
        row = {"model": model_name, "backend": backend, "workload": name, "atoms": atoms}
        row.update(fields)
        if "seconds" in row:
            row["atoms_per_s"] = atoms / row["seconds"]
            row["us_per_atom_step"] = 1e6 * row["seconds"] / atoms
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save(result)

    def measure(label: str, call: Callable[[str, bool], object], **fields) -> None:
        for name, (_, periodic) in loads.items():
            try:
                seconds = timed(lambda n=name, p=periodic: call(n, p), args.repeats, device)
                record(label, name, seconds=seconds, **fields)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                record(label, name, out_of_memory=True)

    modules = {"mace-torch": reference}
    smallest = min(graphs, key=lambda name: graphs[name].num_atoms)
    for backend in args.backends:
        if backend != "eager" and time.monotonic() > deadline:
            for name in loads:
                record(backend, name, skipped="time budget")
            continue
        start = time.monotonic()
        try:
            runner = our_backend(ours, backend, device, args.cache_dir, graphs[smallest])
        except (BackendUnavailableError, ValueError) as err:
            for name in loads:
                record(backend, name, skipped=str(err))
            continue
        setup = time.monotonic() - start
        measure(
            backend,
            lambda n, p, r=runner: r(graphs[n], compute_forces=True, compute_stress=p),
            setup_s=setup,
        )
        if backend == "cueq" and time.monotonic() < deadline:
            try:
                modules["mace-torch+cueq"] = mace_cueq(reference, device)
            except Exception as err:  # mace's converter or cuequivariance missing
                for name in loads:
                    record("mace-torch+cueq", name, skipped=f"{type(err).__name__}: {err}")
    for label, module in modules.items():

        def call(name: str, periodic: bool, m=module):
            fresh = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in theirs[name].items()}
            return m(fresh, compute_stress=periodic, training=False)

        measure(label, call)
    crystals = [name for name in loads if name.startswith("crystal")]
    largest = max(crystals, key=lambda name: graphs[name].num_atoms)
    structures = [Structure.from_atoms(a) for a in loads[largest][0]]

    def build() -> object:
        return build_batch_on_device(
            structures, config.elements, config.r_max, config.head_names, torch.float32, device
        )

    record("graph:device", largest, seconds=timed(build, args.repeats, device))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def chart(result: dict, path: Path) -> None:
    """us/atom/step per backend, one panel per model, workloads side by side (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "us_per_atom_step" in r and r["backend"] != "graph:device"]
    models = sorted({r["model"] for r in rows})
    if not models:
        return
    figure, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        names = list(dict.fromkeys(r["workload"] for r in mine))
        width = 0.8 / max(len(backends), 1)
        for k, backend in enumerate(backends):
            values = {r["workload"]: r["us_per_atom_step"] for r in mine if r["backend"] == backend}
            xs = [i + k * width for i, name in enumerate(names) if name in values]
            axis.bar(xs, [values[n] for n in names if n in values], width, label=backend)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=15)
        axis.set_yscale("log")
        axis.set_ylabel("us / atom / step (lower is better)")
        axis.set_title(f"{model} on {result['device']}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--molecules", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="mp0_medium,mh1_like")
    parser.add_argument("--backends", default="eager,cueq,compile,aot")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.models = args.models.split(",")
    args.backends = args.backends.split(",")

    def save(result: dict) -> None:
        args.json.write_text(json.dumps(result, indent=1))

    result = run(args, save)
    if args.png is not None:
        chart(result, args.png)


if __name__ == "__main__":
    main()
