"""The client needs no torch: in a subprocess where importing torch fails, the package
imports, and a RemoteCalculator and ``crossfield compute`` talk to a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from client_support import running_server, small_model

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {name!r})")
            return None

    sys.meta_path.insert(0, NoTorch())
    """
)

USE_THE_CLIENT = textwrap.dedent(
    """
    import sys
    from ase.build import bulk

    import crossfield.client
    # the engine adapters and the offline path import their heavy parts only when used
    import crossfield.client.ipi, crossfield.client.ipi_cli, crossfield.client.lammps
    import crossfield.client.lammps_cli, crossfield.client.offline
    from crossfield.client import RemoteCalculator
    from crossfield.cli import main

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = RemoteCalculator(sys.argv[1])
    print("energy", atoms.get_potential_energy(), atoms.get_stress().shape)
    atoms.write(sys.argv[2] + "/in.xyz")
    status = main(["compute", sys.argv[2] + "/in.xyz", "--out", sys.argv[2] + "/out.xyz",
                   "--server", sys.argv[1], "--no-progress"])
    assert status == 0, status
    assert "torch" not in sys.modules
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch blocked")
    """
)


@pytest.fixture(scope="module")
def address():
    with running_server(small_model()) as address:
        yield address


def test_client_works_without_torch(address, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + USE_THE_CLIENT, address, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert "energy" in done.stdout and "(6,)" in done.stdout
    assert "1 structures, 4 atoms" in done.stdout and "0 failed" in done.stdout
    assert "torch blocked" in done.stdout  # the blocker really was active
