"""``crossfield serve`` flags for the limits on untrusted graph building (``GraphLimits``).

Light on purpose: ``crossfield --help`` imports this, and must not import torch.
"""

from __future__ import annotations

import argparse

GIB = 1024**3


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "untrusted structures",
        "Limits checked before a structure is queued (estimated) and after its neighbour "
        "list (exact); beyond them it is refused with INVALID_ARGUMENT. See the README.",
    )
    group.add_argument(
        "--max-coordinate",
        type=float,
        default=1e8,
        help="largest |coordinate| of an atom, A; bounds the extent of open directions and "
        "the positions relative to a periodic cell (default 1e8: float64 still places "
        "atoms to 1e-8 A)",
    )
    group.add_argument(
        "--max-neighbours-per-atom",
        type=float,
        default=1000.0,
        help="estimated neighbours per atom within the cutoff (default 1000)",
    )
    group.add_argument(
        "--max-structure-edges",
        type=int,
        default=1 << 20,
        help="edges (directed neighbour pairs) of one structure (default 1048576); the "
        "neighbour list never examines more than 8x as many pairs",
    )
    group.add_argument(
        "--max-structure-memory-gb",
        type=float,
        default=2.0,
        help="GiB one structure may need to evaluate: its edges times the model's bytes per "
        "edge, measured once per model (default 2)",
    )
    group.add_argument(
        "--graph-in-process-pairs",
        type=int,
        default=1 << 19,
        help="structures whose neighbour list examines at most this many pairs are built "
        "in-process; larger ones in worker processes (default 524288; 0: all in workers)",
    )
    group.add_argument(
        "--graph-timeout",
        type=float,
        default=10.0,
        help="seconds a graph worker may spend on one structure; beyond it the worker is "
        "killed and the structure refused as poison (default 10)",
    )
    group.add_argument(
        "--graph-workers", type=int, default=1, help="graph worker processes (default 1)"
    )
    group.add_argument(
        "--device-graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="find neighbour pairs on the model's device with vesin-torch, after the checks "
        "above (auto: on a CUDA device; on: on the CPU too, for structures proven cheap; "
        "off: always on the host)",
    )


def graph_limits(args: argparse.Namespace):
    """The ``GraphLimits`` the flags ask for (ValueError naming a bad one)."""
    from .graph_cost import GraphLimits

    flags = {
        "max_edges": "--max-structure-edges",
        "max_memory": "--max-structure-memory-gb",
        "in_process_pairs": "--graph-in-process-pairs",
        "timeout": "--graph-timeout",
        "workers": "--graph-workers",
    }
    try:
        return _limits(GraphLimits, args)
    except ValueError as err:
        name, _, rest = str(err).partition(":")
        raise ValueError(f"{flags.get(name, '--' + name.replace('_', '-'))}:{rest}") from None


def _limits(limits_type, args: argparse.Namespace):
    return limits_type(
        max_coordinate=args.max_coordinate,
        max_neighbours_per_atom=args.max_neighbours_per_atom,
        max_edges=args.max_structure_edges,
        max_memory=args.max_structure_memory_gb * GIB,
        in_process_pairs=args.graph_in_process_pairs,
        timeout=args.graph_timeout,
        workers=args.graph_workers,
        device_graphs=args.device_graphs,
    )
