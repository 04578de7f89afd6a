"""``crossfield relax``: relax a file of structures on a server (``Relax``).

Reads whatever ``ase.io`` reads, lazily, streams it to the server, which relaxes
everyone's structures together in full batches, and writes the relaxed structures as
extended XYZ in input order, with ``crossfield_energy``, ``crossfield_forces``,
``crossfield_stress`` (Voigt), ``crossfield_steps``, ``crossfield_converged`` and
``crossfield_fmax``. ASE ``FixAtoms`` constraints in the input are kept fixed. A failed
structure is written as it was read with ``crossfield_status`` / ``crossfield_error``
saying why (its last state when it had one), so output lines up with input; ``--resume``
continues an interrupted run after the complete structures already in ``--out``. Exit
status: 0 when every structure was relaxed, 1 when some failed or did not converge, 2 on
a usage error or a run that could not go on.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter

from crossfield.client.cli import complete_frames
from crossfield.client.cli_options import (
    add_server_arguments,
    server_arguments_problem,
    server_client,
)
from crossfield.client.relax import OPTIMIZERS, RelaxResult, relax_many

PREFIX = "crossfield_"
SHOWN_REASONS = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    from pathlib import Path

    parser = subparsers.add_parser(
        "relax",
        help="relax a file of structures on a server (screening)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("input", type=Path, help="structures: any file ase.io.read reads")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output extxyz file")
    add_server_arguments(parser)
    parser.add_argument("--optimizer", default="fire", choices=sorted(OPTIMIZERS))
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/A (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=500, help="(default: %(default)s)")
    parser.add_argument(
        "--relax-cell",
        action="store_true",
        help="relax the cell too (ASE's FrechetCellFilter; periodic structures only)",
    )
    parser.add_argument(
        "--structure-timeout",
        type=float,
        default=None,
        help="seconds per structure (default: none)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--index", default=":", help="ase.io index of the frames (default ':')")
    parser.add_argument("--format", default=None, help="input format, when ASE cannot guess it")
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="unanswered structures (default: 256)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ase.io
    from tqdm.auto import tqdm

    problem = server_arguments_problem(args)
    if not args.input.exists():
        problem = f"input: no such file {args.input}"
    if problem:
        print(f"crossfield relax: {problem}", file=sys.stderr)
        return 2
    done = complete_frames(args.out) if args.resume and args.out.exists() else 0
    frames = itertools.islice(
        ase.io.iread(args.input, index=args.index, format=args.format), done, None
    )
    started = time.perf_counter()
    written = unconverged = 0
    failures: Counter[tuple[str, str]] = Counter()
    client = server_client(args)
    try:
        results = relax_many(
            client,
            frames,
            optimizer=args.optimizer,
            fmax=args.fmax,
            max_steps=args.max_steps,
            relax_cell=args.relax_cell,
            timeout=args.structure_timeout,
            max_in_flight=args.max_in_flight,
        )
        with (
            open(args.out, "a" if done else "w") as out,
            tqdm(disable=args.no_progress, unit="structure", dynamic_ncols=True) as bar,
        ):
            for result in in_order(results):
                ase.io.write(out, annotate(result), format="extxyz")
                out.flush()  # what was written survives an interruption, for --resume
                written += 1
                if not result.ok:
                    failures[(result.error.code, result.error.details)] += 1
                    bar.set_postfix(failed=sum(failures.values()), refresh=False)
                elif not result.converged:
                    unconverged += 1
                bar.update(1)
    except Exception as err:  # a broken input file or no server: say so, keep what was written
        print(
            f"crossfield relax: stopped after {done + written} structures: {err} "
            "(--resume continues from there)",
            file=sys.stderr,
        )
        return 2
    finally:
        client.close()
    elapsed = time.perf_counter() - started
    failed = sum(failures.values())
    print(
        f"crossfield relax: {written} structures in {elapsed:.2f} s "
        f"({written / max(elapsed, 1e-9):.2f} structures/s), {failed} failed, "
        f"{unconverged} not converged in {args.max_steps} steps -> {args.out}"
    )
    for (code, details), count in failures.most_common(SHOWN_REASONS):
        print(f"  {count} x {code}: {details}")
    return 1 if failed or unconverged else 0


def in_order(results):
    """Results re-ordered by ``index`` (those that finish early wait in a buffer)."""
    waiting: dict[int, RelaxResult] = {}
    expected = 0
    for result in results:
        waiting[result.index] = result
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1


def annotate(result: RelaxResult):
    """The structure to write: the relaxed (or last) state with its results, or the input
    as read for a structure that never got evaluated."""
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = result.atoms if result.atoms is not None else result.input
    atoms = atoms.copy()
    atoms.calc = None
    atoms.info[PREFIX + "status"] = "OK" if result.ok else result.error.code
    if not result.ok:
        atoms.info[PREFIX + "error"] = result.error.details
    if result.energy is not None:
        atoms.info[PREFIX + "energy"] = result.energy
        atoms.info[PREFIX + "fmax"] = result.fmax
        atoms.info[PREFIX + "steps"] = result.steps
        atoms.info[PREFIX + "converged"] = result.converged
        atoms.arrays[PREFIX + "forces"] = result.forces
    if result.stress is not None:
        atoms.info[PREFIX + "stress"] = full_3x3_to_voigt_6_stress(result.stress)
    return atoms
