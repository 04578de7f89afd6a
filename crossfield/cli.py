"""The one ``crossfield`` command.

Each subcommand lives with its package (``server/cli.py``, ``training/cli.py``, ...) and
exposes ``register(subparsers)``. Modules are imported only when their subcommand runs,
so ``crossfield --help`` is instant and ``crossfield compute`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

# name -> (module, one-line help). The module defines register(subparsers) -> None, which
# adds the subparser and sets ``func(args) -> int`` as its default.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("crossfield.server.cli", "run the gRPC inference server"),
    "compute": ("crossfield.client.cli", "evaluate a file of structures on a server (screening)"),
    "relax": ("crossfield.client.relax_cli", "relax a file of structures on a server (screening)"),
    "ipi": ("crossfield.client.ipi_cli", "answer i-PI's force clients from a server (PIMD)"),
    "lammps": ("crossfield.client.lammps_cli", "run a LAMMPS script with forces from a server"),
    "train": ("crossfield.training.cli", "train or replay-fine-tune a model from a YAML config"),
    "publish": ("crossfield.training.publish_cli", "publish a checkpoint into a model repository"),
    "compile": ("crossfield.server.compile_cli", "compile a model ahead of time for a server"),
    "import-mace": ("crossfield.model.import_cli", "convert a mace-torch .model file"),
    "data": ("crossfield.training.data_cli", "make or check the reference data sets"),
}

# The extra that installs what a subcommand needs beyond the client (``crossfield compute``
# needs the model only with --checkpoint).
EXTRAS: dict[str, str] = {
    "serve": "server",
    "train": "train",
    "publish": "train",
    "compile": "server",
    "import-mace": "model",
    "data": "data",
    "compute": "model",
    "lammps": "lammps",
}


def version() -> str:
    try:
        return metadata.version("crossfield")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def missing_dependency(command: str, err: ModuleNotFoundError) -> str:
    """One line naming the missing module and the install that brings it."""
    extra = EXTRAS.get(command, "server,train")
    return (
        f"crossfield {command}: needs the optional dependency '{err.name}', which this "
        f"install lacks: pip install 'crossfield[{extra}]' (see the README)"
    )


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossfield",
        description="Serve, train and use multi-head MACE force fields.",
        epilog="Run 'crossfield COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"crossfield {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == wanted:
            try:
                importlib.import_module(module).register(subparsers)
            except ModuleNotFoundError as err:
                if err.name and err.name.startswith("crossfield"):
                    raise
                parser.exit(2, missing_dependency(name, err) + "\n")
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:  # a server or training command in a client-only install
        if err.name is None or err.name.startswith("crossfield"):
            raise
        print(missing_dependency(args.command, err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
