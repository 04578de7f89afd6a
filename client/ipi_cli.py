"""``crossfield ipi``: i-PI's force clients, answered by a Crossfield server.

  i-pi input.xml &
  crossfield ipi --unix water --structure water.xyz --clients 8 --server host:50051

opens 8 driver connections to i-PI's socket (``<ffsocket mode="unix"><address>water``),
one per bead, so that all beads of a step reach the server together and are evaluated as
one batch. ``--structure`` is the file i-PI starts from: it names the elements (i-PI's
protocol carries positions only) and says whether the system is periodic. The command
returns when i-PI ends the run (exit 0), or with exit 1 when the server refuses a
structure, which i-PI cannot do without.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossfield.client.cli_options import (
    add_server_arguments,
    server_arguments_problem,
    server_client,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ipi",
        help="connect i-PI force clients to a server (path-integral MD, batched beads)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--unix",
        metavar="NAME",
        help="i-PI's UNIX socket: the <address> of a unix ffsocket (/tmp/ipi_NAME) or a path",
    )
    where.add_argument("--inet", metavar="HOST:PORT", help="i-PI's TCP socket")
    parser.add_argument(
        "--structure",
        type=Path,
        required=True,
        help="the structure i-PI simulates (any file ASE reads; elements and periodicity)",
    )
    parser.add_argument(
        "--pbc",
        action="store_true",
        help="periodic in all directions with i-PI's cell, whatever the file says (i-PI's own "
        "xyz comment line carries a cell that ASE does not read as periodic)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="driver connections to open: the number of beads (x replicas) evaluates a "
        "whole step in one server batch (default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for i-PI's socket to appear (default: %(default)s)",
    )
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ase.io

    from crossfield.client.errors import CrossfieldError
    from crossfield.client.ipi import (
        Address,
        ProtocolError,
        run_clients,
        server_evaluate,
        unix_path,
    )

    problem = server_arguments_problem(args)
    if problem is None and args.clients < 1:
        problem = f"--clients: must be >= 1, got {args.clients}"
    if problem is None and not args.structure.exists():
        problem = f"--structure: no such file {args.structure}"
    if problem is None and args.inet and ":" not in args.inet:
        problem = f"--inet: expected HOST:PORT, got {args.inet!r}"
    if problem:
        print(f"crossfield ipi: {problem}", file=sys.stderr)
        return 2
    if args.unix:
        address = Address(path=unix_path(args.unix))
    else:
        host, port = args.inet.rsplit(":", 1)
        address = Address(host=host, port=int(port))
    template = ase.io.read(args.structure)
    if args.pbc:
        template.pbc = True
    try:
        with server_client(args) as client:
            evaluations = run_clients(
                address,
                template,
                server_evaluate(client),
                clients=args.clients,
                connect_timeout=args.connect_timeout,
            )
    except (CrossfieldError, ProtocolError, ConnectionError) as err:
        print(f"crossfield ipi: {err}", file=sys.stderr)
        return 1
    print(f"crossfield ipi: i-PI finished; {evaluations} structures evaluated")
    return 0
