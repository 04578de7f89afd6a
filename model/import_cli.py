"""``crossfield import-mace``: convert a mace-torch ``.model`` file into a Crossfield model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import cutoff_jump_sources
from .heads import select_heads
from .mace import CrossfieldMACE
from .mace_file import read_mace_file
from .mace_import import UnsupportedMaceModelError, convert_mace, mace_state_dict
from .repository import publish
from .smoothness import cutoff_jumps, element_pairs

DESCRIPTION = """\
Convert a mace-torch MACE / ScaleShiftMACE model (.model file, written under any e3nn
version) into a Crossfield checkpoint. The file is read without executing code from it.

  crossfield import-mace mace-mp.model --out mp.pt
  crossfield import-mace mace-mh-1.model --out /models --name mh1 --heads omat_pbe,spice_wB97M

With --out ending in .pt a checkpoint file is written; otherwise --out is a model
repository and the model is published there as the next version of --name.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-mace",
        help="convert a mace-torch .model file",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="mace-torch .model file")
    parser.add_argument(
        "--out", type=Path, required=True, help="checkpoint file (*.pt) or model repository folder"
    )
    parser.add_argument(
        "--name", help="model name in the repository (default: the source file's stem)"
    )
    parser.add_argument("--version", type=int, help="repository version (default: next free)")
    parser.add_argument("--heads", help="comma-separated heads to keep (default: all)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        help="stored precision (default: the source model's)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        tree = read_mace_file(args.source)
        source_dtype = next(iter(mace_state_dict(tree).values())).dtype
        dtype = getattr(torch, args.dtype) if args.dtype else source_dtype
        if not dtype.is_floating_point:
            dtype = torch.float64
        model = convert_mace(tree, dtype=dtype)
        if args.heads:
            model = select_heads(model, [h.strip() for h in args.heads.split(",") if h.strip()])
    except (UnsupportedMaceModelError, ValueError, KeyError, FileNotFoundError) as err:
        print(f"crossfield import-mace: {err}", file=sys.stderr)
        return 1
    meta = {
        "source": args.source.name,
        "converted_from": "mace-torch",
        "heads": model.config.head_names,
    }
    if model.config.reproduce_cutoff_jump:
        meta["cutoff_jump_eV"] = warn_cutoff_jump(model)
    if args.out.suffix == ".pt":
        save_checkpoint(model, args.out, metadata=meta)
        where = args.out
    else:
        where = publish(
            model, args.out, args.name or args.source.stem, meta=meta, version=args.version
        )
    config = model.config
    precision = str(dtype).removeprefix("torch.")
    print(
        f"wrote {where}: {config.num_layers} x {config.interaction} layers, "
        f"hidden {config.hidden_irreps}, {config.num_elements} elements, "
        f"heads {config.head_names}, {precision}"
    )
    return 0


MEASURED_PAIRS = 300  # dimers per head probed for the jump (all pairs of small tables)


def warn_cutoff_jump(model: CrossfieldMACE) -> float:
    """Say that (and by how much) the source is discontinuous; return the largest jump.

    The converted model reproduces mace-torch exactly, jump included, because agreement
    with the source is what an import promises; the user learns how large it is and
    that fine-tuning with ``crossfield train`` gives a smooth model.
    """
    config = model.config
    pairs = element_pairs(config.elements, limit=MEASURED_PAIRS)
    worst = cutoff_jumps(model, pairs=pairs)[0]
    print(
        f"warning: the source model's energy is discontinuous at r_max={config.r_max} A: "
        f"{'; '.join(cutoff_jump_sources(config))}.\n"
        f"  measured on {len(pairs)} element pairs x {config.num_heads} heads: largest jump "
        f"{worst.describe()}.\n"
        "  The import reproduces mace-torch exactly, jump included; NVE dynamics will not "
        "conserve energy. Fine-tune it with `crossfield train` for a smooth model.",
        file=sys.stderr,
    )
    return abs(worst.jump)
