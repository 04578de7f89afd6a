"""``crossfield compute`` against a real server: the numbers of in-process evaluation, every
input structure in the output (failures marked, not fatal), any format ASE reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from client_support import mixed_structures, running_server, small_model

from crossfield.cli import main
from crossfield.model import Structure, evaluate

BAD = {17: 92, 250: 94}  # uranium and plutonium are not in the model's element table


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def address(model):
    with running_server(model) as address:
        yield address


def test_compute_500_structures_matches_in_process(model, address, tmp_path: Path, capsys) -> None:
    structures = mixed_structures(500, seed=7)
    for index, number in BAD.items():
        structures[index].numbers[0] = number
    source, target = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    ase.io.write(source, structures, format="extxyz")
    status = main(
        [
            "compute",
            str(source),
            "--out",
            str(target),
            "--server",
            address,
            "--model",
            "small",
            "--head",
            "r2scan",
            "--properties",
            "energy,forces,stress,energies",
            "--no-progress",
            "--max-in-flight",
            "64",
        ]
    )
    assert status == 1  # some structures failed, and the run still finished
    summary = capsys.readouterr().out
    assert "500 structures" in summary and "2 failed" in summary and "structures/s" in summary
    reasons = [line for line in summary.splitlines() if "x INVALID_ARGUMENT" in line]
    assert len(reasons) == 2 and "(first: structure 17)" in summary  # one line per reason

    written = ase.io.read(target, index=":")
    assert len(written) == 500
    structures = ase.io.read(source, index=":")  # what the server saw: rounded by the file
    good = [i for i in range(500) if i not in BAD]
    expected = evaluate(model, [Structure.from_atoms(structures[i], head="r2scan") for i in good])
    for index, want in zip(good, expected):
        atoms = written[index]
        np.testing.assert_allclose(atoms.positions, structures[index].positions, atol=1e-12)
        assert atoms.info["crossfield_status"] == "OK"
        assert atoms.info["crossfield_model"] == "small:1:r2scan"
        assert atoms.info["crossfield_energy"] == pytest.approx(float(want["energy"]), rel=1e-10)
        forces, energies = atoms.arrays["crossfield_forces"], atoms.arrays["crossfield_energies"]
        np.testing.assert_allclose(forces, want["forces"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(energies, want["node_energy"], atol=1e-7)
        if atoms.pbc.any():
            stress = want["stress"][[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            np.testing.assert_allclose(atoms.info["crossfield_stress"], stress, atol=1e-12)
    for index, number in BAD.items():
        atoms = written[index]
        assert atoms.info["crossfield_status"] == "INVALID_ARGUMENT"
        assert str(number) in atoms.info["crossfield_error"]
        assert "crossfield_energy" not in atoms.info and "crossfield_forces" not in atoms.arrays


@pytest.mark.parametrize("name,format", [("POSCAR", "vasp"), ("copper.cif", "cif")])
def test_command_reads_any_ase_format(model, address, tmp_path: Path, name: str, format: str):
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.rattle(0.02, seed=4)
    ase.io.write(tmp_path / name, crystal, format=format)
    command = [
        sys.executable,
        "-m",
        "crossfield.cli",
        "compute",
        str(tmp_path / name),
        "--out",
        str(tmp_path / "out.xyz"),
        "--server",
        address,
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert "1 structures, 4 atoms" in done.stdout and "0 failed" in done.stdout
    [written] = ase.io.read(tmp_path / "out.xyz", index=":")
    [want] = evaluate(model, [Structure.from_atoms(ase.io.read(tmp_path / name, format=format))])
    assert written.info["crossfield_energy"] == pytest.approx(float(want["energy"]), rel=1e-10)


def test_unreachable_server_stops_with_a_clear_message(tmp_path: Path, capsys) -> None:
    from client_support import free_port

    source = tmp_path / "in.extxyz"
    ase.io.write(source, mixed_structures(3), format="extxyz")
    status = main(
        [
            "compute",
            str(source),
            "--out",
            str(tmp_path / "out.xyz"),
            "--server",
            f"127.0.0.1:{free_port()}",
            "--timeout",
            "1",
            "--no-progress",
        ]
    )
    assert status == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
