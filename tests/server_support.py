"""Shared pieces of the server tests: a small real model, structures, a loopback server.

The model is small (8 channels, L=2, correlation 2) so the whole server suite runs in a
couple of minutes on two cores, but it is the real architecture with several heads whose
E0s and scales differ, so a structure answered by the wrong head would be caught.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import torch
from ase.build import bulk, molecule

from crossfield.model import CrossfieldMACE, HeadConfig, ModelConfig, Structure, build_model
from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.batcher import BatchLimits
from crossfield.server.models import Backend
from crossfield.v1 import inference_pb2_grpc
from crossfield.v1.messages import compute_request

ELEMENTS = [1, 6, 7, 8, 14]
HEADS = ("pbe", "r2scan", "wb97")


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> CrossfieldMACE:
    """A small random-weight model with three heads (different E0s, scales and shifts)."""
    n = len(ELEMENTS)
    config = ModelConfig(
        elements=ELEMENTS,
        heads=[
            HeadConfig(
                "pbe",
                e0s=[-13.6 - i for i in range(n)],
                scale=0.8,
                level_of_theory={"functional": "PBE", "code": "VASP"},
            ),
            HeadConfig(
                "r2scan",
                e0s=[-13.0 - 2 * i for i in range(n)],
                shift=0.1,
                level_of_theory={"functional": "r2SCAN"},
            ),
            HeadConfig(
                "wb97",
                e0s=[-12.0 + i for i in range(n)],
                scale=1.3,
                level_of_theory={"functional": "wB97M-V", "basis": "def2-TZVPD"},
            ),
        ],
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
        avg_num_neighbors=8.0,
    )
    return build_model(config, seed=seed).to(dtype).eval()


def nan_for_element(model: CrossfieldMACE, number: int) -> CrossfieldMACE:
    """``model`` giving NaN forces on every structure that holds element ``number``: a
    structure that breaks the model, on demand (validation refuses the inputs that would
    do it to a real model, such as two atoms on one spot)."""
    forward = model.forward
    element = model.config.elements.index(number)

    def poisoned(graph, *args, **kwargs):
        out = forward(graph, *args, **kwargs)
        structures = graph.batch[graph.node_elements == element].unique()
        atoms = torch.isin(graph.batch, structures)
        out["energy"] = torch.where(
            torch.isin(torch.arange(len(out["energy"])), structures), torch.nan, out["energy"]
        )
        if "forces" in out:
            out["forces"] = torch.where(atoms[:, None], torch.nan, out["forces"])
        return out

    model.forward = poisoned
    return model


def structures(count: int, seed: int = 0) -> list[Structure]:
    """Mixed molecules (open boundaries) and crystals (periodic, 8-64 atoms), rattled so
    that no two are alike, cycling through the heads."""
    rng = np.random.default_rng(seed)
    templates = [
        molecule("H2O"),
        molecule("CH4"),
        molecule("C6H6"),
        molecule("CH3CH2OH"),
        molecule("NH3"),
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2)),
        bulk("C", "diamond", a=3.57),
    ]
    result = []
    for index in range(count):
        atoms = templates[index % len(templates)].copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        if atoms.pbc.any():
            atoms.cell = atoms.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3)))
        head = HEADS[(index // len(templates) + index) % len(HEADS)]
        result.append(Structure.from_atoms(atoms, head=head))
    return result


def request_for(
    structure: Structure, properties=("energy", "forces"), model: str = "small", id: str = ""
) -> object:
    periodic = any(structure.pbc)
    return compute_request(
        structure.numbers,
        structure.positions,
        structure.cell if periodic else None,
        structure.pbc if periodic else None,
        model=model,
        head=structure.head or "",
        properties=properties,
        id=id,
    )


@contextmanager
def running_server(
    models: dict[str, CrossfieldMACE],
    dtype: torch.dtype = torch.float64,
    backend: Backend | None = None,
    settings: dict | None = None,
    **limits,
) -> Iterator[InferenceServer]:
    """A real server on 127.0.0.1 (ephemeral gRPC and metrics ports) serving ``models``
    by name with ``backend`` (default eager); ``limits`` override BatchLimits fields or
    ``max_atoms_per_structure``, ``settings`` other ServerConfig fields."""
    max_atoms = limits.pop("max_atoms_per_structure", 4096)
    fields = dict(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        device="cpu",
        dtype=dtype,
        limits=BatchLimits(**limits),
        max_atoms_per_structure=max_atoms,
        grace=5.0,
        backend=backend or Backend(),
    )
    config = ServerConfig(**{**fields, **(settings or {})})
    server = InferenceServer(config)
    for name, model in models.items():
        server.add_model(model, name, "1", {"purpose": "test"})
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=2.0)


def assert_close(actual, expected, what: str, rtol: float = 1e-10) -> None:
    """``actual`` within ``rtol`` of the largest magnitude of ``expected`` (float64 through
    a server: round-off only, so 1e-10 is generous)."""
    expected = np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(np.asarray(actual) - expected).max()) / scale
    assert error <= rtol, f"{what}: relative difference {error:.2e} > {rtol}"


def stub(server: InferenceServer) -> inference_pb2_grpc.InferenceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return inference_pb2_grpc.InferenceStub(channel)


def scrape(server: InferenceServer) -> dict[tuple[str, frozenset], float]:
    """The metrics endpoint over HTTP, parsed: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@contextmanager
def runner_held(server: InferenceServer) -> Iterator[None]:
    """The server's device kept busy: its place is reserved as a batcher reserves it before
    handing over a batch, so structures queue and batch up as they do while a batch
    computes, instead of running the moment they arrive. On leaving, the device is idle
    again and the queued batch runs."""
    if not server.runner.reserve(None, idle_only=True):
        raise RuntimeError("runner_held: the runner is busy")
    try:
        yield
    finally:
        server.runner.release()


def queued(server: InferenceServer, model: str = "small") -> float:
    """Structures waiting in ``model``'s queues (all versions), from the metrics."""
    return sum(
        value
        for (name, labels), value in scrape(server).items()
        if name == "crossfield_queue_depth" and ("model", model) in labels
    )


def wait_queued(server: InferenceServer, count: int, model: str = "small") -> None:
    """Wait until at least ``count`` structures are queued for ``model``."""
    deadline = time.monotonic() + 30.0
    while queued(server, model) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {count} structures to queue")
        time.sleep(0.02)
