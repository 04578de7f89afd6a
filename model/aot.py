"""Compile once, load in seconds: an AOTInductor package of energies, forces and stress.

torch.compile keeps its work in caches that a cold replica must fill again (560-816 s on
a 2-core CPU, README). Instead, a model version is compiled *ahead of time* into one
file, an AOTInductor package (``.pt2``: a shared library plus the weights), that a server
loads in well under a second and runs with no Python in the model at all.

Forces and stress come from autograd, which ``torch.export`` does not trace. As in
NequIP's ``nequip-compile --mode aotinductor``, ``make_fx`` first traces the whole step,
``torch.autograd.grad`` included, at the level of ATen operations: the backward pass is
recorded as the ordinary operations the autograd engine runs, so the traced graph computes
energies, forces, virials and stress in one forward program. That graph is exported with
the atom, edge and structure counts as dynamic dimensions (``make_fx`` in symbolic mode,
with duck shaping off so that no count is equated with a model dimension of the same
size) and compiled by AOTInductor. Batches are padded as for torch.compile
(``backends.pad_batch``), so no count is ever 0 or 1.

An artefact is keyed by everything it depends on (``artefact_key``): the package format,
torch's version, the model's dtype, config and weights (``backends.model_fingerprint``)
and the device kind (CPU vector ISA, or CUDA compute capability). A package is a shared
library, i.e. code: it lives in the server's private compile cache, built there on first
load or ahead of time by ``crossfield compile``, never in the shared model repository,
which holds data only. Whatever its origin, the loaded program is checked against eager
on every head before it serves (``CompiledModel.warm_up``).

The per-element product (MP-0's) sorts atoms into blocks whose sizes are data, which an
exported graph cannot hold: such models are refused with a message naming the config field.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .graph import GraphBatch
from .mace import CrossfieldMACE, derivatives

AOT_FORMAT = "1"  # the exported program's signature and outputs; bump when they change
OUTPUTS = ("energy", "node_energy", "forces", "virials", "stress")

Outputs = dict[str, torch.Tensor]


def check_exportable(model: CrossfieldMACE) -> None:
    """``ValueError`` naming the config field when ``model`` cannot be exported."""
    if model.config.product == "element":
        raise ValueError(
            "backend: 'aot' cannot export per-element product weights (config.product = "
            "'element'): their atom blocks depend on each batch's composition, which an "
            "exported graph cannot hold; use 'compile' or 'eager'"
        )


def device_kind(device: torch.device) -> str:
    """What compiled kernels depend on besides the model: the CPU's vector instruction set
    (Inductor compiles for the one it finds) or the GPU's compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return f"cpu-{str(pick_vec_isa()).replace(' ', '-') or 'scalar'}"


def artefact_key(model: CrossfieldMACE, device: torch.device) -> str:
    from .backends import model_fingerprint

    parts = (AOT_FORMAT, model_fingerprint(model), device_kind(device))
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:24]


def artefact_name(model: CrossfieldMACE, device: torch.device) -> str:
    return f"aot-{artefact_key(model, device)}.pt2"


class _Program(torch.nn.Module):
    """Energies and their derivatives from tensors only: the function that is exported."""

    def __init__(self, model: CrossfieldMACE) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        positions: torch.Tensor,
        node_elements: torch.Tensor,
        cell: torch.Tensor,
        edge_index: torch.Tensor,
        unit_shifts: torch.Tensor,
        batch: torch.Tensor,
        heads: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        positions = positions.detach().requires_grad_(True)
        strain = torch.zeros_like(cell).requires_grad_(True)
        # strained_energy reads no ptr (the structure count comes from the cell's shape)
        graph = GraphBatch(
            node_elements, positions, cell, edge_index, unit_shifts, batch, batch, heads
        )
        energy, node_energy, _ = self.model.strained_energy(graph, positions, strain)
        out = derivatives(energy, positions, strain, cell)
        return energy, node_energy, out["forces"], out["virials"], out["stress"]


def _arguments(batch: GraphBatch) -> tuple[torch.Tensor, ...]:
    b = batch
    return (b.positions, b.node_elements, b.cell, b.edge_index, b.unit_shifts, b.batch, b.heads)


@contextlib.contextmanager
def _no_duck_shapes() -> Iterator[None]:
    """make_fx equates dynamic sizes that happen to be equal (duck shaping): an atom count
    of 16 would become the channel count. Off while tracing (NequIP does the same)."""
    config = torch.fx.experimental._config
    previous = config.use_duck_shape
    config.use_duck_shape = False
    try:
        yield
    finally:
        config.use_duck_shape = previous


def export_program(model: CrossfieldMACE, example: GraphBatch) -> torch.export.ExportedProgram:
    """The traced step (autograd unrolled into ATen operations) exported with dynamic
    atom, edge and structure counts; ``example`` is a padded batch (counts >= 2)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    check_exportable(model)
    program = _Program(model)
    arguments = _arguments(example)
    with _no_duck_shapes(), torch.enable_grad():
        traced = make_fx(
            program,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
            _error_on_data_dependent_ops=True,
        )(*[argument.clone() for argument in arguments])
    atoms = torch.export.Dim("atoms", min=2)
    edges = torch.export.Dim("edges", min=2)
    structures = torch.export.Dim("structures", min=2)
    dynamic = (
        {0: atoms},
        {0: atoms},
        {0: structures},
        {1: edges},
        {0: edges},
        {0: atoms},
        {0: structures},
    )
    return torch.export.export(traced, arguments, dynamic_shapes=dynamic)


def build_artefact(model: CrossfieldMACE, example: GraphBatch, path: Path) -> float:
    """Compile ``model`` into an AOTInductor package at ``path`` (written under a temporary
    name, then renamed: a reader never sees half a package); returns the seconds taken."""
    start = time.perf_counter()
    exported = export_program(model, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=str(temporary))
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return time.perf_counter() - start


class AOTStep:
    """Runs a loaded package in place of the module: padded batch in, unpadded outputs."""

    def __init__(self, path: Path, device: torch.device, r_max: float) -> None:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self.package = torch._inductor.aoti_load_package(str(path), device_index=index)
        self.path = path
        self.r_max = r_max
        # The package's OpenMP regions take the calling thread's thread count, and a
        # runner thread starts with every core's: keep the count of the loading thread.
        self.threads = torch.get_num_threads()

    def __call__(self, batch: GraphBatch, compute_forces: bool, compute_stress: bool) -> Outputs:
        from .backends import pad_batch, unpad

        n, e, b = batch.num_atoms, batch.num_edges, batch.num_structures
        padded = pad_batch(batch, n + 2, e + 2, b + 1, self.r_max)
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            values = self.package(*_arguments(padded))
        out = dict(zip(OUTPUTS, values))
        if not compute_forces:
            del out["forces"]
        if not compute_stress:
            del out["virials"], out["stress"]
        return unpad(out, n, b)


def load_or_build(
    model: CrossfieldMACE, example: GraphBatch, cache_dir: Path | None
) -> tuple[AOTStep, bool]:
    """The model's package from ``cache_dir`` if one matches its key, else built there
    (in a temporary folder without a cache) and loaded; also whether it was built now."""
    device = model.e0s.device
    if cache_dir is None:
        import tempfile

        cache_dir = Path(tempfile.mkdtemp(prefix="crossfield-aot-"))
    path = cache_dir / "aot" / artefact_name(model, device)
    built = not path.exists()
    if built:
        build_artefact(model, example, path)
    return AOTStep(path, device, model.config.r_max), built
