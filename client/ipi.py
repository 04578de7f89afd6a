"""i-PI force clients backed by a Crossfield server: ``crossfield ipi``.

i-PI (path-integral and replica-exchange MD) runs the dynamics and asks connected *force
clients* for energies and forces over a socket, one structure per request (a bead or a
replica). Each connection made here is one such client: it speaks the standard i-PI
driver protocol, turns i-PI's positions and cell (atomic units) into a structure and
asks the server. With as many connections as beads, all beads of a step are in flight
together and the server's dynamic batcher evaluates them as one batch. A connection that
i-PI opens in batched mode (``batch_size:N`` in its INIT string, i-PI >= 3.2) receives N
structures per request and sends them over one stream.

i-PI never tells a client which elements it simulates; they come from ``--structure``,
the same file i-PI starts from (atoms in the same order), which also says whether the
system is periodic. Virials are sent for periodic systems (NPT needs them), zeros for
molecules. This module needs no i-PI installed: only the protocol travels.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from crossfield.client.client import Client
from crossfield.client.results import Result, has_volume

HEADER_BYTES = 12

Evaluate = Callable[[list[Atoms]], list[Result]]


class ProtocolError(RuntimeError):
    """i-PI sent something the driver protocol does not allow here."""


@dataclass(frozen=True)
class Address:
    """Where i-PI listens: a UNIX socket path, or a TCP host and port."""

    path: str | None = None
    host: str = "localhost"
    port: int = 0

    def connect(self, timeout: float) -> socket.socket:
        """Connect, retrying until ``timeout``: i-PI creates its socket only once it has
        read its input, and clients are usually started beside it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: object = self.path
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                target = (self.host, self.port)
            try:
                sock.connect(target)
                return sock
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise ConnectionError(f"i-PI at {self}: {err}") from None
                time.sleep(0.2)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def unix_path(name: str, prefix: str = "/tmp/ipi_") -> str:
    """i-PI's path for ``<address>name</address>`` in unix mode (a path is kept as is)."""
    return name if "/" in name else prefix + name


class Driver:
    """One i-PI force client on one socket: answers STATUS, INIT, POSDATA, GETFORCE and
    returns on EXIT (or when i-PI closes the connection)."""

    def __init__(self, sock: socket.socket, template: Atoms, evaluate: Evaluate) -> None:
        self.sock, self.template, self.evaluate = sock, template, evaluate
        self.initialised = False
        self.batch_size = 1
        self.results: list[Result] | None = None
        self.evaluations = 0

    def run(self) -> None:
        try:
            while True:
                try:
                    header = self._receive(HEADER_BYTES).decode().strip()
                except ConnectionError:
                    return  # i-PI closed the socket: it has finished
                if header == "EXIT":
                    return
                handler = {
                    "STATUS": self._status,
                    "INIT": self._init,
                    "POSDATA": self._posdata,
                    "GETFORCE": self._getforce,
                }.get(header)
                if handler is None:
                    raise ProtocolError(f"unexpected message {header!r} from i-PI")
                handler()
        finally:
            self.sock.close()

    def _status(self) -> None:
        if not self.initialised:
            self._send_header("NEEDINIT")
        else:
            self._send_header("HAVEDATA" if self.results is not None else "READY")

    def _init(self) -> None:
        _bead, length = struct.unpack("<ii", self._receive(8))
        parameters = self._receive(length).decode(errors="replace")
        for token in parameters.replace(",", " ").split():
            key, _, value = token.partition(":")
            if key == "batch_size" and value.strip().isdigit():
                self.batch_size = int(value)
        self.initialised = True

    def _posdata(self) -> None:
        if self.batch_size == 1:
            cells = [self._array(9)]
            self._array(9)  # the inverse cell: not needed
            (count,) = struct.unpack("<i", self._receive(4))
            positions = [self._array(3 * count)]
        else:
            (count,) = struct.unpack("<i", self._receive(4))
            blocks = self._array(18 * self.batch_size).reshape(self.batch_size, 18)
            cells = [block[:9] for block in blocks]
            positions = list(self._array(3 * count * self.batch_size).reshape(self.batch_size, -1))
        if count != len(self.template):
            raise ProtocolError(
                f"i-PI sent {count} atoms; --structure has {len(self.template)}: "
                "give the structure i-PI simulates"
            )
        structures = [self._structure(c, p) for c, p in zip(cells, positions)]
        self.results = self.evaluate(structures)
        self.structures = structures
        self.evaluations += len(structures)

    def _structure(self, cell: np.ndarray, positions: np.ndarray) -> Atoms:
        atoms = self.template.copy()
        atoms.positions = positions.reshape(-1, 3) * units.Bohr
        if atoms.pbc.any():  # i-PI's cell has the lattice vectors as columns
            atoms.cell = cell.reshape(3, 3).T * units.Bohr
        return atoms

    def _getforce(self) -> None:
        if self.results is None:
            raise ProtocolError("GETFORCE before POSDATA")
        energies, forces, virials = [], [], []
        for atoms, result in zip(self.structures, self.results):
            energies.append(result.energy / units.Ha)
            forces.append(result.forces.reshape(-1) * units.Bohr / units.Ha)
            virial = np.zeros((3, 3))
            if result.stress is not None:
                virial = -atoms.get_volume() * result.stress / units.Ha
            virials.append(virial.T.reshape(-1))
        count = len(self.template)
        payload = [b"FORCEREADY".ljust(HEADER_BYTES)]
        if self.batch_size == 1:
            payload += [np.float64(energies[0]).tobytes(), struct.pack("<i", count)]
            payload += [forces[0].tobytes(), virials[0].tobytes(), struct.pack("<i", 0)]
        else:
            payload += [np.asarray(energies).tobytes(), struct.pack("<i", count)]
            payload += [np.concatenate(forces).tobytes(), np.concatenate(virials).tobytes()]
            payload += [struct.pack("<i", 0)] * self.batch_size
        self.sock.sendall(b"".join(payload))
        self.results = None

    def _send_header(self, text: str) -> None:
        self.sock.sendall(text.encode().ljust(HEADER_BYTES))

    def _array(self, count: int) -> np.ndarray:
        return np.frombuffer(self._receive(8 * count), dtype="<f8").copy()

    def _receive(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        while received < size:
            chunk = self.sock.recv_into(view[received:], size - received)
            if chunk == 0:
                raise ConnectionError("i-PI closed the connection")
            received += chunk
        return bytes(buffer)


def server_evaluate(client: Client) -> Evaluate:
    """Evaluate structures on the server: one unary call for one structure (the lowest
    latency), one stream for a batch. A refused structure stops the run: i-PI cannot go on
    without its forces."""

    def evaluate(structures: list[Atoms]) -> list[Result]:
        properties = ["energy", "forces"]
        if any(has_volume(a) for a in structures):
            properties.append("stress")
        if len(structures) == 1:
            return [client.compute(structures[0], properties)]
        results = list(client.compute_many(structures, properties))
        for result in results:
            if not result.ok:
                raise result.error
        return results

    return evaluate


def run_clients(
    address: Address,
    template: Atoms,
    evaluate: Evaluate,
    clients: int = 1,
    connect_timeout: float = 60.0,
) -> int:
    """Connect ``clients`` force clients to i-PI and serve them until i-PI ends the run;
    the number of structures evaluated. The first failure of any client is raised.

    Each client connects in its own thread and answers at once: i-PI handshakes with one
    connection at a time and listens with a small backlog, so connecting all clients
    before answering any would leave the later ones waiting for ever."""
    drivers: list[Driver] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def serve() -> None:
        try:
            driver = Driver(address.connect(connect_timeout), template, evaluate)
            with lock:
                drivers.append(driver)
            driver.run()
        except BaseException as err:  # reported by the caller, after the others stop
            with lock:
                errors.append(err)
                for other in drivers:  # i-PI cannot go on without this client's forces
                    with contextlib.suppress(OSError):
                        other.sock.shutdown(socket.SHUT_RDWR)

    threads = [threading.Thread(target=serve, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(d.evaluations for d in drivers)
