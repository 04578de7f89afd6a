"""``crossfield compile``: build a version's AOTInductor package once, ahead of serving.

A server (``--backend auto``, the default, or ``aot``) and ``CrossfieldCalculator`` load a
package matching their model, dtype and device kind from the compile cache in a fraction
of a second and run small structures 2-5x faster than eager; without one, ``auto`` runs
eager and ``aot`` compiles (minutes) at start. This command builds that package into the
cache beforehand, from a checkpoint, a mace-torch ``.model``, a repository version or (no
arguments) the shipped default model, on a machine of the kind that will run it, and
checks it against eager on every head as the server would (``model/aot.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile a model ahead of time (AOTInductor) into a server's compile cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="a checkpoint or mace-torch .model (default, without --repo: the shipped "
        "default model, which 'crossfield serve' serves without arguments)",
    )
    source.add_argument("--repo", type=Path, help="a model repository (with --name)")
    parser.add_argument("--name", help="the model's name in --repo")
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu", help="torch device of the server (cpu, cuda)")
    parser.add_argument(
        "--compile-cache",
        metavar="PATH",
        type=Path,
        default=None,
        help="the server's --compile-cache (default: $XDG_CACHE_HOME/crossfield or "
        "~/.cache/crossfield)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.set_defaults(func=run)


def model_file(args: argparse.Namespace) -> Path:
    """The file to compile: ``--checkpoint``, or a version of ``--name`` in ``--repo``."""
    if args.checkpoint is not None:
        return args.checkpoint
    if args.repo is None:
        from crossfield.model.presets import DEFAULT_CHECKPOINT

        return DEFAULT_CHECKPOINT
    from crossfield.model.repository import list_versions, version_path

    from .repository_files import checkpoint_file

    if not args.name:
        raise SystemExit("crossfield compile: --repo needs --name")
    versions = list_versions(args.repo, args.name)
    if not versions:
        raise SystemExit(f"crossfield compile: {args.repo}/{args.name} has no versions")
    version = args.version if args.version is not None else versions[-1]
    if version not in versions:
        raise SystemExit(f"crossfield compile: {args.name} has no version {version}: {versions}")
    return checkpoint_file(version_path(args.repo, args.name, version))


def run(args: argparse.Namespace) -> int:
    import torch

    from crossfield.model.aot import artefact_name
    from crossfield.model.backends import compile_model, default_cache_dir
    from crossfield.model.loading import load_model_file

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = args.compile_cache or default_cache_dir()
    path = model_file(args)
    dtype = getattr(torch, args.dtype)
    try:
        model = load_model_file(path).to(device=args.device, dtype=dtype).eval()
        compiled = compile_model(model, "aot", dtype, args.device, cache)
        report = compiled.warm_up()
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"crossfield compile: {err}") from None
    how = "loaded (already compiled)" if compiled.loaded_from_cache else "compiled"
    name = artefact_name(compiled.model, torch.device(args.device))
    print(
        f"crossfield compile: {path} {how} in {report.seconds:.1f} s as {cache / 'aot' / name}; "
        f"every head matches eager (energy {report.max_energy_error:.2g} eV, forces "
        f"{report.max_force_error:.2g} eV/A)",
        flush=True,
    )
    return 0
