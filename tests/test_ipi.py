"""Real i-PI runs path-integral MD with its forces from a Crossfield server through
``crossfield ipi``: every bead's potential energy equals in-process evaluation of that
bead's positions, and i-PI exits cleanly. Two runs: water with 4 beads and a PILE-L
thermostat over a UNIX socket with one connection per bead; methane with 3 beads and an
SVR thermostat over TCP with i-PI's batched protocol on one connection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from client_support import free_port, running_server

from crossfield.cli import main
from crossfield.model import HeadConfig, ModelConfig, Structure, build_model, evaluate

I_PI = Path(sys.executable).parent / "i-pi"
pytestmark = pytest.mark.skipif(not I_PI.exists(), reason="i-PI (PyPI ipi) is not installed")
STEPS = 4

INPUT = """<simulation verbosity='low'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [ step, bead_potentials{{electronvolt}} ] </properties>
    <trajectory filename='pos' stride='1' format='ase'> positions </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name='crossfield' mode='{mode}' pbc='{pbc}'>
    {socket}
  </ffsocket>
  <system>
    <initialize nbeads='{beads}'>
      <file mode='xyz'> start.xyz </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities>
    </initialize>
    <forces><force forcefield='crossfield'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'> 0.25 </timestep>
        {thermostat}
      </dynamics>
    </motion>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
  </system>
</simulation>
"""


@pytest.fixture(scope="module")
def model():
    """Small E0s, so i-PI's printed potentials (9 digits) resolve 1e-8 eV."""
    config = ModelConfig(
        elements=[1, 6, 8, 29],
        heads=[HeadConfig("pbe", e0s=[-0.5, -1.0, -1.5, -0.2], scale=0.8)],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
        avg_num_neighbors=4.0,
    )
    return build_model(config, seed=11)


@pytest.fixture(scope="module")
def address(model):
    with running_server(model) as address:
        yield address


def write_start(folder: Path, name: str) -> Path:
    """i-PI's xyz: its cell in the comment line (a 20 A box for a molecule, which i-PI
    needs even then; the crystal's own cell), which ASE reads as not periodic."""
    if name == "Cu":
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=3)
        a, b, c = atoms.cell.lengths()
    else:
        atoms, (a, b, c) = molecule(name), (20.0, 20.0, 20.0)
    cell = f"# CELL(abcABC): {a:.6f} {b:.6f} {c:.6f} 90.0 90.0 90.0 positions{{angstrom}}"
    lines = [str(len(atoms)), cell]
    lines += [
        f"{s} {x:.8f} {y:.8f} {z:.8f}" for s, (x, y, z) in zip(atoms.symbols, atoms.positions)
    ]
    path = folder / "start.xyz"
    path.write_text("\n".join(lines) + "\n")
    return path


CASES = {
    "water-unix-4-beads": dict(
        molecule="H2O",
        beads=4,
        mode="unix",
        thermostat="<thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat>",
        clients=4,
        batch=1,
    ),
    "copper-crystal-unix-2-beads": dict(
        molecule="Cu",
        beads=2,
        mode="unix",
        thermostat="<thermostat mode='langevin'><tau units='femtosecond'>50</tau></thermostat>",
        clients=2,
        batch=1,
        periodic=True,
    ),
    "methane-tcp-batched-3-beads": dict(
        molecule="CH4",
        beads=3,
        mode="inet",
        thermostat="<thermostat mode='svr'><tau units='femtosecond'>50</tau></thermostat>",
        clients=1,
        batch=3,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_path_integral_md_through_the_server(model, address, tmp_path, case, capsys) -> None:
    spec = CASES[case]
    start = write_start(tmp_path, spec["molecule"])
    if spec["mode"] == "unix":
        name = f"crossfield-test-{os.getpid()}-{case}"
        socket, where = f"<address>{name}</address>", ["--unix", name]
    else:
        port = free_port()
        socket = f"<address>127.0.0.1</address><port>{port}</port>"
        where = ["--inet", f"127.0.0.1:{port}"]
    if spec["batch"] > 1:
        socket += f"<batch_size>{spec['batch']}</batch_size>"
        socket += "<consolidate_messages>true</consolidate_messages>"
    (tmp_path / "input.xml").write_text(
        INPUT.format(
            steps=STEPS,
            seed=1234,
            mode=spec["mode"],
            pbc="true" if spec.get("periodic") else "false",
            socket=socket,
            beads=spec["beads"],
            thermostat=spec["thermostat"],
        )
    )
    with open(tmp_path / "ipi.log", "w") as log:
        ipi = subprocess.Popen(
            [sys.executable, str(I_PI), "input.xml"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            status = main(
                ["ipi", *where, "--structure", str(start), "--clients", str(spec["clients"])]
                + ["--server", address, "--connect-timeout", "60"]
                + (["--pbc"] if spec.get("periodic") else [])
            )
            assert ipi.wait(timeout=60) == 0, (tmp_path / "ipi.log").read_text()[-3000:]
        finally:
            if ipi.poll() is None:
                ipi.kill()
    assert status == 0
    steps = STEPS + 1  # i-PI evaluates the start too
    assert f"{steps * spec['beads']} structures evaluated" in capsys.readouterr().out
    assert "Exiting cleanly" in (tmp_path / "ipi.log").read_text()

    printed = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert printed.shape == (steps, 1 + spec["beads"])
    for bead in range(spec["beads"]):
        frames = ase.io.read(tmp_path / f"sim.pos_{bead}.extxyz", index=":")
        assert len(frames) == steps
        periodic = (bool(spec.get("periodic")),) * 3
        structures = [Structure(f.numbers, f.positions, f.cell.array, periodic) for f in frames]
        energies = [float(r["energy"]) for r in evaluate(model, structures, compute_stress=False)]
        np.testing.assert_allclose(printed[:, 1 + bead], energies, rtol=0, atol=2e-6)
    moved = ase.io.read(tmp_path / "sim.pos_0.extxyz", index=-1).positions
    assert np.abs(moved - ase.io.read(start).positions).max() > 1e-3  # the beads moved
    shutil.rmtree(tmp_path, ignore_errors=True)  # i-PI's RESTART and outputs
