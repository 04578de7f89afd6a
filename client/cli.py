"""``crossfield compute``: evaluate a file of structures on servers (screening farms).

Reads whatever ``ase.io`` reads, lazily (a trajectory of millions of frames is never held
in memory), streams it to the servers and writes extended XYZ in input order: every
input structure appears in the output, the failed ones without results and with
``crossfield_status`` / ``crossfield_error`` saying why, so output lines up with input.
Exit status: 0 when every structure was evaluated, 1 when some failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_SERVER = "localhost:50051"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compute",
        help="evaluate a file of structures on a server (screening)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("input", type=Path, help="structures: any file ase.io.read reads")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output extxyz file")
    parser.add_argument(
        "--server",
        "-s",
        action="append",
        default=None,
        help=f"server address host:port; repeat or comma-separate for several "
        f"(round-robin); default {DEFAULT_SERVER}",
    )
    parser.add_argument("--model", "-m", default="", help="model name (default: the server's)")
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument("--head", default="", help="head / level of theory (default: the model's)")
    parser.add_argument(
        "--properties",
        default="energy,forces,stress",
        help="comma-separated from energy,forces,stress,energies; stress only for "
        "periodic structures (default: %(default)s)",
    )
    parser.add_argument("--index", default=":", help="ase.io index of the frames (default ':')")
    parser.add_argument("--format", default=None, help="input format, when ASE cannot guess it")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="structures unanswered at a time, over all servers (default: %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token (default: $CROSSFIELD_TOKEN; prefer the variable over the flag)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    parser.add_argument(
        "--root-certificates", type=Path, default=None, help="PEM file of trusted roots (TLS)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ase.io

    from crossfield.client.client import Client

    if not args.input.exists():
        print(f"crossfield compute: input: no such file {args.input}", file=sys.stderr)
        return 2
    servers = [a.strip() for s in (args.server or [DEFAULT_SERVER]) for a in s.split(",")]
    properties = [p.strip() for p in args.properties.split(",") if p.strip()]
    root_certificates = args.root_certificates.read_bytes() if args.root_certificates else None
    client = Client(
        [s for s in servers if s],
        model=args.model,
        version=args.version,
        head=args.head,
        token=args.token or os.environ.get("CROSSFIELD_TOKEN"),
        tls=args.tls,
        root_certificates=root_certificates,
    )
    frames = ase.io.iread(args.input, index=args.index, format=args.format)
    originals: dict[int, object] = {}

    def remembered():
        """The input frames, kept until their result is written."""
        for index, atoms in enumerate(frames):
            originals[index] = atoms
            yield atoms

    started = time.perf_counter()
    structures = atoms_count = failed = 0
    try:
        with client, open(args.out, "w") as out:
            results = client.compute_many(
                remembered(),
                properties,
                max_in_flight=args.max_in_flight,
                progress=not args.no_progress,
            )
            for result in results:
                atoms = originals.pop(result.index)
                annotate(atoms, result)
                ase.io.write(out, atoms, format="extxyz")
                structures += 1
                atoms_count += len(atoms)
                failed += not result.ok
    except Exception as err:  # a broken input file or no server: say so, keep what was written
        print(f"crossfield compute: stopped after {structures} structures: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(
        f"crossfield compute: {structures} structures, {atoms_count} atoms in {elapsed:.2f} s "
        f"({structures / max(elapsed, 1e-9):.1f} structures/s), {failed} failed -> {args.out}"
    )
    return 1 if failed else 0


def annotate(atoms, result) -> None:
    """Attach a result to ``atoms`` the way extxyz stores it (a single-point calculator),
    with the status and the model version that answered in ``atoms.info``."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms.calc = None
    for key in ("energy", "free_energy", "stress"):
        atoms.info.pop(key, None)
    for key in ("forces", "energies"):
        if key in atoms.arrays:
            del atoms.arrays[key]
    if not result.ok:
        atoms.info["crossfield_status"] = result.error.code
        atoms.info["crossfield_error"] = result.error.details
        return
    atoms.info["crossfield_status"] = "OK"
    atoms.info["crossfield_model"] = f"{result.model}:{result.version}:{result.head}"
    values = {"energy": result.energy, "free_energy": result.energy, "forces": result.forces}
    if result.stress is not None:
        values["stress"] = full_3x3_to_voigt_6_stress(result.stress)
    if result.energies is not None:
        values["energies"] = result.energies
    atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in values.items() if v is not None})
