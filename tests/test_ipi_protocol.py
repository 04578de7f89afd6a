"""The i-PI driver protocol, spoken by hand over a socket pair, for what the i-PI runs in
``test_ipi.py`` do not reach: a periodic, sheared cell (i-PI sends lattice vectors as
columns) and the virial that NPT needs, against in-process evaluation."""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from client_support import running_server, small_model

from crossfield.client import Client
from crossfield.client.ipi import Driver, server_evaluate
from crossfield.model import Structure, evaluate


def header(text: str) -> bytes:
    return text.encode().ljust(12)


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the driver closed the connection"
        data += chunk
    return data


def test_periodic_structure_and_virial() -> None:
    model = small_model(seed=4)
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True)
    crystal.set_cell(crystal.cell.array @ [[1, 0.1, 0.05], [0, 1, 0.08], [0, 0, 1]], True)
    crystal.rattle(0.05, seed=2)
    ipi, ours = socket.socketpair()
    with running_server(model) as address, Client(address, model="small") as client:
        driver = Driver(ours, crystal.copy(), server_evaluate(client))
        thread = threading.Thread(target=driver.run, daemon=True)
        thread.start()
        ipi.sendall(header("STATUS"))
        assert receive(ipi, 12).strip() == b"NEEDINIT"
        ipi.sendall(header("INIT") + struct.pack("<ii", 0, 1) + b"0")
        ipi.sendall(header("STATUS"))
        assert receive(ipi, 12).strip() == b"READY"
        h = crystal.cell.array.T / units.Bohr  # i-PI: lattice vectors as columns, in bohr
        positions = crystal.positions / units.Bohr
        ipi.sendall(header("POSDATA") + h.tobytes() + np.linalg.inv(h).tobytes())
        ipi.sendall(struct.pack("<i", len(crystal)) + positions.tobytes())
        ipi.sendall(header("STATUS"))
        assert receive(ipi, 12).strip() == b"HAVEDATA"
        ipi.sendall(header("GETFORCE"))
        assert receive(ipi, 12).strip() == b"FORCEREADY"
        (energy,) = struct.unpack("<d", receive(ipi, 8))
        (count,) = struct.unpack("<i", receive(ipi, 4))
        forces = np.frombuffer(receive(ipi, 24 * count)).reshape(count, 3)
        virial = np.frombuffer(receive(ipi, 72)).reshape(3, 3)
        (extra,) = struct.unpack("<i", receive(ipi, 4))
        ipi.sendall(header("EXIT"))
        thread.join(timeout=10)
    assert not thread.is_alive() and extra == 0 and count == len(crystal)
    [want] = evaluate(model, [Structure.from_atoms(crystal)])
    assert energy * units.Ha == pytest.approx(float(want["energy"]), rel=1e-12)
    np.testing.assert_allclose(forces * units.Ha / units.Bohr, want["forces"], atol=1e-9)
    expected = -crystal.get_volume() * want["stress"]  # i-PI's virial: -V * stress
    np.testing.assert_allclose(virial.T * units.Ha, expected, atol=1e-9)
    assert np.abs(expected).max() > 1e-2  # a real virial, not zeros
