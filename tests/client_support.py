"""Shared pieces of the client tests: a small real model and a real server on loopback.

The server is the one ``crossfield serve`` runs (``crossfield.server.app``), started in
this process on 127.0.0.1 with an ephemeral port, serving in float64 so that remote and
in-process results agree to float noise.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from crossfield.model import CrossfieldMACE, HeadConfig, ModelConfig, build_model
from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.batcher import BatchLimits

ELEMENTS = [1, 6, 7, 8, 13, 29]
HEADS = ("pbe", "r2scan")


def small_model(seed: int = 0) -> CrossfieldMACE:
    """A small random-weight model in float64 with two heads (different E0s and scales)."""
    config = ModelConfig(
        elements=ELEMENTS,
        heads=[
            HeadConfig("pbe", e0s=[-13.6, -1030.0, -1485.0, -2040.0, -1.0, -2.0], scale=0.8),
            HeadConfig("r2scan", e0s=[-13.0, -1029.0, -1484.0, -2039.0, -1.5, -2.5], shift=0.1),
        ],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
        avg_num_neighbors=8.0,
    )
    return build_model(config, seed=seed, dtype=torch.float64)


@contextmanager
def running_server(
    model: CrossfieldMACE,
    name: str = "small",
    version: str = "1",
    max_delay: float = 0.0005,
    max_queue: int = 4096,
) -> Iterator[str]:
    """A real server for ``model`` (a copy: serving moves and freezes it) on loopback;
    yields its address."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        device="cpu",
        dtype=torch.float64,
        limits=BatchLimits(max_delay=max_delay, max_queue=max_queue),
        grace=5.0,
    )
    server = InferenceServer(config)
    server.add_model(copy.deepcopy(model), name, version)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=1.0)


def free_port() -> int:
    """A loopback port nobody listens on (for unreachable-server tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copper_crystal(
    repeat: tuple[int, int, int] = (2, 1, 1), rattle: float = 0.05, seed: int = 1
) -> Atoms:
    """Rattled fcc copper (8 atoms by default)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * repeat
    atoms.rattle(rattle, seed=seed)
    return atoms


def mixed_structures(count: int, seed: int = 0) -> list[Atoms]:
    """Molecules and crystals with random displacements, cells and heads of every kind."""
    rng = np.random.default_rng(seed)
    templates = [
        molecule("H2O"),
        molecule("CH4"),
        molecule("NH3"),
        molecule("C2H6"),
        bulk("Cu", "fcc", a=3.6),
        bulk("Al", "fcc", a=4.05, cubic=True),
        bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1),
    ]
    structures = []
    for index in range(count):
        atoms = templates[index % len(templates)].copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        if atoms.pbc.any():
            atoms.set_cell(atoms.cell.array * rng.uniform(0.98, 1.02), scale_atoms=True)
        structures.append(atoms)
    return structures
