"""``crossfield compute``: evaluate a file of structures on servers (screening farms).

Reads whatever ``ase.io`` reads, lazily (a trajectory of millions of frames is never held
in memory), streams it to the servers (or evaluates it in this process with
``--checkpoint``) and writes extended XYZ in input order. The input's own labels are kept:
predictions go beside them under a prefix (``crossfield_energy``, ``crossfield_forces``,
...), so a parity plot against one's reference data is one file away. Every input
structure appears in the output; failed ones carry ``<prefix>status`` / ``<prefix>error``
saying why, so output lines up with input, and the terminal gets the failures by reason.
Exit status: 0 when every structure was evaluated, 1 when some failed, 2 on a usage error
or a run that could not go on.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import Counter
from pathlib import Path

from crossfield.client.cli_options import (
    add_server_arguments,
    server_arguments_problem,
    server_client,
)

DEFAULT_PREFIX = "crossfield_"
SHOWN_REASONS = 10  # distinct failure reasons printed on the terminal


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compute",
        help="evaluate a file of structures on a server (screening)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("input", type=Path, help="structures: any file ase.io.read reads")
    parser.add_argument("--out", "-o", type=Path, required=True, help="output extxyz file")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="evaluate in this process from a checkpoint (.pt) or mace-torch .model file, "
        "without a server (needs the [model] extra)",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--properties",
        default="energy,forces,stress",
        help="comma-separated from energy,forces,stress,energies; stress only for "
        "periodic structures (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="prefix of the written predictions and status keys (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run: keep the complete structures already in --out "
        "and evaluate only the rest",
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
        "--batch-size",
        type=int,
        default=32,
        help="structures per forward pass with --checkpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float64",
        choices=["float32", "float64"],
        help="precision with --checkpoint (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ase.io

    problem = _usage_problem(args)
    if problem:
        print(f"crossfield compute: {problem}", file=sys.stderr)
        return 2
    properties = [p.strip() for p in args.properties.split(",") if p.strip()]
    done = complete_frames(args.out) if args.resume and args.out.exists() else 0
    frames = itertools.islice(
        ase.io.iread(args.input, index=args.index, format=args.format), done, None
    )
    originals: dict[int, object] = {}

    def remembered():
        """The input frames, kept until their result is written."""
        for index, atoms in enumerate(frames):
            originals[index] = atoms
            yield atoms

    started = time.perf_counter()
    structures = atoms_count = 0
    failures: Counter[tuple[str, str]] = Counter()
    first_failure: dict[tuple[str, str], int] = {}
    try:
        with (
            _Results(args, remembered(), properties) as results,
            open(args.out, "a" if done else "w") as out,
        ):
            for result in results:
                atoms = originals.pop(result.index)
                annotate(atoms, result, args.prefix)
                ase.io.write(out, atoms, format="extxyz")
                out.flush()  # what was written survives an interruption, for --resume
                structures += 1
                atoms_count += len(atoms)
                if not result.ok:
                    reason = (result.error.code, result.error.details)
                    failures[reason] += 1
                    first_failure.setdefault(reason, done + result.index)
    except ModuleNotFoundError:  # --checkpoint in a client-only install: said by crossfield.cli
        raise
    except Exception as err:  # a broken input file or no server: say so, keep what was written
        print(
            f"crossfield compute: stopped after {done + structures} structures: {err} "
            f"(--resume continues from there)",
            file=sys.stderr,
        )
        return 2
    elapsed = time.perf_counter() - started
    failed = sum(failures.values())
    resumed = f" (after {done} already in {args.out})" if done else ""
    print(
        f"crossfield compute: {structures} structures, {atoms_count} atoms in {elapsed:.2f} s "
        f"({structures / max(elapsed, 1e-9):.1f} structures/s), {failed} failed{resumed} "
        f"-> {args.out}"
    )
    for (code, details), count in failures.most_common(SHOWN_REASONS):
        first = first_failure[(code, details)]
        print(f"  {count} x {code}: {details} (first: structure {first})")
    if len(failures) > SHOWN_REASONS:
        print(f"  ... and {len(failures) - SHOWN_REASONS} more reasons; see {args.prefix}error")
    return 1 if failed else 0


def _usage_problem(args: argparse.Namespace) -> str | None:
    if not args.input.exists():
        return f"input: no such file {args.input}"
    if not args.prefix:
        return "--prefix: must not be empty (predictions would overwrite the input's labels)"
    if args.checkpoint is not None:
        if args.server:
            return "--checkpoint and --server: choose one (in this process, or on a server)"
        if not args.checkpoint.exists():
            return f"--checkpoint: no such file {args.checkpoint}"
    return server_arguments_problem(args)


class _Results:
    """The results of the run as a context manager: a server's stream, closed at the end,
    or in-process evaluation from a checkpoint."""

    def __init__(self, args: argparse.Namespace, structures, properties: list[str]) -> None:
        self.args, self.structures, self.properties = args, structures, properties
        self.client = None

    def __enter__(self):
        args = self.args
        if args.checkpoint is not None:
            from crossfield.client.offline import compute_offline

            return compute_offline(
                args.checkpoint,
                self.structures,
                self.properties,
                head=args.head,
                dtype=args.dtype,
                batch_size=args.batch_size,
            )
        self.client = server_client(args)
        return self.client.compute_many(
            self.structures,
            self.properties,
            max_in_flight=args.max_in_flight,
            progress=not args.no_progress,
        )

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()


def complete_frames(path: Path) -> int:
    """How many complete extended-XYZ frames ``path`` holds; a frame cut short by an
    interruption is truncated away, so appending continues from a clean end."""
    complete, good_end = 0, 0
    with open(path, "rb") as file:
        while True:
            header = file.readline()
            if not header.strip():
                break
            try:
                count = int(header)
            except ValueError:
                break
            lines = [file.readline() for _ in range(count + 1)]
            if not lines or not all(line.endswith(b"\n") for line in lines):
                break
            complete += 1
            good_end = file.tell()
    with open(path, "r+b") as file:
        file.truncate(good_end)
    return complete


def annotate(atoms, result, prefix: str = DEFAULT_PREFIX) -> None:
    """Write ``result`` into ``atoms`` under ``prefix``, leaving the input's own labels
    (its calculator, ``info`` and ``arrays``) as they were read. Stress is Voigt order
    (xx, yy, zz, yz, xz, xy) in eV/A^3, as ASE's ``get_stress``; per-atom energies in eV."""
    from ase.stress import full_3x3_to_voigt_6_stress

    for key in [k for k in atoms.info if k.startswith(prefix)]:
        del atoms.info[key]  # stale predictions of an earlier run over this file
    for key in [k for k in atoms.arrays if k.startswith(prefix)]:
        del atoms.arrays[key]
    if not result.ok:
        atoms.info[prefix + "status"] = result.error.code
        atoms.info[prefix + "error"] = result.error.details
        return
    atoms.info[prefix + "status"] = "OK"
    atoms.info[prefix + "model"] = f"{result.model}:{result.version}:{result.head}"
    if result.energy is not None:
        atoms.info[prefix + "energy"] = result.energy
    if result.stress is not None:
        atoms.info[prefix + "stress"] = full_3x3_to_voigt_6_stress(result.stress)
    if result.extrapolated_elements:
        atoms.info[prefix + "extrapolated_elements"] = list(result.extrapolated_elements)
    if result.forces is not None:
        atoms.arrays[prefix + "forces"] = result.forces
    if result.energies is not None:
        atoms.arrays[prefix + "energies"] = result.energies
