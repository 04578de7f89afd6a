"""Every README code block runs as written, against a real server serving the shipped
default model (the address ``localhost:50051`` is replaced by the test server's).

Python blocks run one by one, each in a fresh namespace, so a block that relies on names
from another fails. Shell blocks run with bash in a folder holding the files they name
(a structures file, an i-PI input, a LAMMPS script). Blocks that cannot run here are
listed in ``NOT_RUN`` with the reason and the test that covers them instead; a new block
that neither runs nor is listed fails the test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
from ase.build import molecule
from client_support import running_server

from crossfield.model.presets import default_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADDRESS = "localhost:50051"

# first line of a block (prefix) -> why it does not run here
NOT_RUN = {
    "python3 -m venv .venv": "creates a fresh environment; CI runs the test line (.ci/run)",
    "pip install .": "installs into the environment; the wheel build was checked by hand",
    "crossfield compile  ": "compiles for minutes, then serves until stopped; "
    "tests/test_backends_aot.py (slow) runs compile then serve from its cache",
    "import torch\nfrom ase.build import bulk\nfrom crossfield.model import Structure, evaluate\n"
    "from crossfield.model.backends": "compiles for minutes; tests/test_backends_compile.py",
    "crossfield import-mace mace-mh-1.model": "needs MACE-MH-1, which cannot be downloaded "
    "here; tests/test_mace_agreement.py converts mace-torch files",
    "crossfield train config.yaml": "needs a config of one's own data; tests/test_training_*",
    "crossfield train training/recipes/default/": "trains the default model (hours on two "
    "cores); tests/test_default_model.py checks the result, tests/test_training_loop.py "
    "the trainer",
    "export CROSSFIELD_TOKEN": "serves until stopped, with certificates; tests/test_security_*",
    "proto/crossfield/v1/": "the layout, not a command",
    "bench/gpu_wheels.sh": "downloads wheels for, and runs on, a CUDA GPU machine; "
    "tests/test_gpu_suite.py and tests/test_gpu_*.py",
}


def blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    return [(m[1], m[2]) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def skipped(code: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if code.startswith(start)), None)


IPI_INPUT = """<simulation verbosity='low'>
  <total_steps>3</total_steps>
  <ffsocket name='crossfield' mode='unix' pbc='false'><address>{name}</address></ffsocket>
  <system>
    <initialize nbeads='8'>
      <file mode='xyz'> water.xyz </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities>
    </initialize>
    <forces><force forcefield='crossfield'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'> 0.5 </timestep>
        <thermostat mode='pile_g'><tau units='femtosecond'>100</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units='kelvin'>300</temperature></ensemble>
  </system>
</simulation>
"""

LAMMPS_SCRIPT = """units metal
atom_style atomic
boundary p p p
lattice fcc 3.7
region box block 0 2 0 2 0 2
create_box 2 box
create_atoms 1 box
set type 1 type/fraction 2 0.25 7
mass 1 63.546
mass 2 196.97
velocity all create 300 42
fix crossfield all external pf/callback 1 1
fix_modify crossfield energy yes virial yes
fix md all nve
thermo 2
run 4
"""


def prepare(folder: Path, ipi_name: str) -> None:
    """The files the shell blocks name, as a user would have them."""
    ase.io.write(folder / "structures.extxyz", [molecule(n) for n in ("H2O", "CH4", "C6H6")])
    (folder / "model").mkdir()
    shutil.copy(ROOT / "model" / "default.pt", folder / "model" / "default.pt")
    water = molecule("H2O")
    lines = ["3", "# CELL(abcABC): 20 20 20 90 90 90 positions{angstrom}"]
    lines += [
        f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(water.symbols, water.positions)
    ]
    (folder / "water.xyz").write_text("\n".join(lines) + "\n")
    (folder / "input.xml").write_text(IPI_INPUT.format(name=ipi_name))
    (folder / "in.lammps").write_text(LAMMPS_SCRIPT)


def run_shell(
    code: str, folder: Path, env: dict, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``bash -e -c code`` in its own process group, all of which is killed on a timeout
    (a block may start background processes, such as i-PI)."""
    shell = subprocess.Popen(
        ["bash", "-e", "-c", code],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = shell.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        out, err = shell.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{code}\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(shell.args, shell.returncode, out, err)


@pytest.fixture(scope="module")
def address():
    with running_server(default_model(), name="default") as address:
        yield address


def test_every_block_runs_or_says_why_not(address, tmp_path, monkeypatch) -> None:
    ipi_name = f"crossfield-readme-{os.getpid()}"
    prepare(tmp_path, ipi_name)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONWARNINGS": "ignore"}
    ran = []
    for language, code in blocks():
        if skipped(code):
            continue
        code = code.replace(ADDRESS, address)
        if language == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
            ran.append((code.splitlines()[0], printed.getvalue()))
        elif language == "bash":
            code = code.replace("--unix water", f"--unix {ipi_name}")
            done = run_shell(code + "\nwait", tmp_path, env)
            assert done.returncode == 0, f"{code}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            ran.append((code.splitlines()[0], done.stdout))
        else:
            pytest.fail(f"a README block neither runs nor is listed in NOT_RUN:\n{code}")
    outputs = "\n".join(out for _, out in ran)
    assert len(ran) == 9, [first for first, _ in ran]
    # the MD example moves: a temperature comes out, not 0 K
    md = next(out for first, out in ran if first.startswith("from ase import units"))
    assert not md.startswith("0 K"), md
    assert "crossfield ipi: i-PI finished; 32 structures evaluated" in outputs
    assert "crossfield lammps: done; 5 evaluations" in outputs
    assert (tmp_path / "results.extxyz").exists() and (tmp_path / "offline.extxyz").exists()
    assert "crossfield relax: 3 structures" in outputs and (tmp_path / "relaxed.extxyz").exists()
    relaxed = next(out for first, out in ran if first.startswith("from crossfield.client"))
    assert relaxed.startswith("True"), relaxed  # converged
