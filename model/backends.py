"""Inference backends: one call contract for the runner, several ways to execute it.

``compile_model(model, backend, dtype, device, cache_dir)`` returns a :class:`CompiledModel`
that the runner uses in place of the module: a ``GraphBatch`` in, a dict with ``energy``,
``node_energy``, ``forces``, ``virials`` and ``stress`` out, as from ``CrossfieldMACE``.
``warm_up`` compiles at load time and checks the results against eager, so no request
ever waits for a compiler and a backend that computes wrong numbers never serves.

- ``eager``: the module as it is (parameters frozen, so autograd tracks positions only).
- ``compile``: torch.compile (Inductor) of the whole inference step. Dynamo traces the
  ``torch.autograd.grad`` call too (``trace_autograd_ops``), so energy, forces and stress
  are one compiled graph without an autograd-engine pass at run time.
- ``script``: TorchScript. ``strained_energy`` is traced with the positions and a strain
  as inputs; forces and stress are its gradients, taken by autograd outside the trace.
- ``cueq``: the symmetric contractions and convolutions through cuequivariance-torch
  (``backends_cueq.py``, the ``[cueq]`` extra), checked against the e3nn model on every head.
- ``aot``: an AOTInductor package of energies, forces and stress (``aot.py``), compiled
  once per version, device kind and dtype into ``cache_dir`` and loaded in seconds after.
- ``auto``: ``aot`` when ``cache_dir`` already holds the model's package (``crossfield
  compile`` or an earlier ``aot`` start built it), else ``eager``. It is the fastest
  correct path that never puts a compiler (minutes) in front of the first answer: for
  MD-sized inputs eager is dominated by Python and per-operation overhead (~12 ms for a
  water molecule on one CPU thread), which the package removes (docs/aot.json).

Batch sizes. Atom, edge and structure counts are dynamic dimensions of one graph per
property set. Every batch gets a two-atom dummy structure (:func:`pad_batch`) first, so no
count is ever 0 or 1, values torch.compile would specialise on and recompile for. The
alternative, padding to a ladder of static size buckets (``shapes="buckets"``), gives one
graph per bucket triple; bench/backends.py measures both (docs/backends.json) and the
dynamic graph is the default because it compiles once (see the README's numbers).

Compiled artefacts are cached under ``cache_dir``: Inductor's FX-graph and AOTAutograd
caches (``TORCHINDUCTOR_CACHE_DIR``) for ``compile``, the traced module as a .pt file for
``script``; the cache is the server's own, keep it private to the server's user.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .graph import GraphBatch, Structure, build_batch
from .mace import CrossfieldMACE, derivatives

BACKENDS = ("eager", "compile", "script", "cueq", "aot")
BACKEND_CHOICES = (*BACKENDS, "auto")  # auto: resolved to one of BACKENDS by compile_model
SHAPES = ("dynamic", "buckets")

# (compute_forces, compute_stress) combinations a runner asks for. Compiled backends build
# one graph for energies alone and one for forces, which always includes the stress.
PROPERTY_SETS = ((False, False), (True, False), (True, True))
STRESS_OUTPUTS = ("virials", "stress")

# Dynamo settings for our graphs: trace torch.autograd.grad into the graph (forces and
# stress without a graph break), and treat Python floats (model constants) as constants:
# otherwise dynamo first makes them symbolic, then restarts the whole analysis.
# Settings a torch release does not know are left out: without trace_autograd_ops the graph
# breaks at the gradient, and AOTAutograd's compiled backward computes the forces.
log = logging.getLogger(__name__)

COMPILE_CONFIG = {
    name: value
    for name, value in {"trace_autograd_ops": True, "specialize_float": True}.items()
    if hasattr(torch._dynamo.config, name)
}

Outputs = dict[str, torch.Tensor]
Step = Callable[[GraphBatch, bool, bool], Outputs]


class BackendUnavailableError(RuntimeError):
    """The backend cannot run on this machine (no CUDA, a missing optional package)."""


# -- padding -------------------------------------------------------------------------------


def bucket(count: int, smallest: int, ratio: float = 1.5) -> int:
    """The smallest size of the ladder ``smallest * ratio**k`` (rounded up) >= ``count``."""
    size = smallest
    while size < count:
        size = max(size + 1, math.ceil(size * ratio))
    return size


def pad_batch(
    batch: GraphBatch, atoms: int, edges: int, structures: int, r_max: float
) -> GraphBatch:
    """``batch`` with dummy atoms, edges and structures appended up to the given counts.

    The dummy atoms form one extra structure (any further structures are empty), and
    every dummy edge joins dummy atom 0 and dummy atom 1, half a cutoff apart (a
    zero-length edge would put NaNs into the radial basis). No edge touches a real atom,
    so the real structures' energies, forces and stresses are exactly those of ``batch``.
    """
    n, e, b = batch.num_atoms, batch.num_edges, batch.num_structures
    extra_atoms, extra_edges = atoms - n, edges - e
    if extra_atoms < 2 or extra_edges < 0 or structures < b + 1:
        raise ValueError(
            f"pad_batch: need >= 2 more atoms, >= 0 more edges and >= 1 more structure than "
            f"the batch ({n} atoms, {e} edges, {b} structures), got {atoms}, {edges}, {structures}"
        )
    like = batch.positions
    index = torch.arange(extra_edges, device=like.device)
    sender = n + index % 2
    dummy_positions = like.new_zeros(extra_atoms, 3)
    dummy_positions[1, 0] = 0.5 * r_max
    return GraphBatch(
        node_elements=torch.cat([batch.node_elements, batch.node_elements.new_zeros(extra_atoms)]),
        positions=torch.cat([like, dummy_positions]),
        cell=torch.cat([batch.cell, batch.cell.new_zeros(structures - b, 3, 3)]),
        edge_index=torch.cat([batch.edge_index, torch.stack([sender, 2 * n + 1 - sender])], 1),
        unit_shifts=torch.cat([batch.unit_shifts, batch.unit_shifts.new_zeros(extra_edges, 3)]),
        batch=torch.cat([batch.batch, batch.batch.new_full((extra_atoms,), b)]),
        ptr=torch.cat([batch.ptr, batch.ptr.new_full((structures - b,), atoms)]),
        heads=torch.cat([batch.heads, batch.heads.new_zeros(structures - b)]),
    )


def unpad(out: Outputs, atoms: int, structures: int) -> Outputs:
    per_atom = {"node_energy", "forces"}
    return {
        name: value[:atoms] if name in per_atom else value[:structures]
        for name, value in out.items()
    }


def mark_dynamic(batch: GraphBatch) -> None:
    """Declare the atom, edge and structure counts dynamic for torch.compile.

    "maybe": where the graph is split (the per-element product runs eagerly), the later
    pieces see tensors made in between, which no mark reaches; they compile static once,
    then dynamic from their second size on (automatic dynamic shapes), within warm-up.
    """
    mark = torch._dynamo.maybe_mark_dynamic
    per_atom = (batch.node_elements, batch.positions, batch.batch)
    per_structure = (batch.cell, batch.ptr, batch.heads)
    for tensor in (*per_atom, *per_structure, batch.unit_shifts):
        mark(tensor, 0)
    mark(batch.edge_index, 1)


# -- the steps each backend runs -----------------------------------------------------------


def inference_step(model: CrossfieldMACE) -> Step:
    """The model's forward pass for inference: outputs detached from any graph."""

    def step(batch: GraphBatch, compute_forces: bool, compute_stress: bool) -> Outputs:
        out = model(batch, compute_forces=compute_forces, compute_stress=compute_stress)
        return {name: value.detach() for name, value in out.items()}

    return step


class _StrainedEnergy(torch.nn.Module):
    """``strained_energy`` with tensor arguments only, the form torch.jit.trace records."""

    def __init__(self, model: CrossfieldMACE) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        positions: torch.Tensor,
        strain: torch.Tensor,
        node_elements: torch.Tensor,
        cell: torch.Tensor,
        edge_index: torch.Tensor,
        unit_shifts: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
        heads: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        graph = GraphBatch(
            node_elements, positions, cell, edge_index, unit_shifts, batch, ptr, heads
        )
        energy, node_energy, _ = self.model.strained_energy(graph, positions, strain)
        return energy, node_energy


def _script_arguments(
    batch: GraphBatch, positions: torch.Tensor, strain: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    b = batch
    return (
        positions, strain, b.node_elements, b.cell, b.edge_index, b.unit_shifts, b.batch,
        b.ptr, b.heads,
    )  # fmt: skip


def script_step(traced: torch.jit.ScriptModule) -> Step:
    """Energy from the traced module; forces and stress by autograd through it."""

    def step(batch: GraphBatch, compute_forces: bool, compute_stress: bool) -> Outputs:
        positions = batch.positions.detach().requires_grad_(compute_forces or compute_stress)
        strain = positions.new_zeros(batch.num_structures, 3, 3).requires_grad_(compute_stress)
        energy, node_energy = traced(*_script_arguments(batch, positions, strain))
        out = {"energy": energy.detach(), "node_energy": node_energy.detach()}
        if compute_forces or compute_stress:
            strain_or_none = strain if compute_stress else None
            out.update(derivatives(energy, positions, strain_or_none, batch.cell))
        return out

    return step


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is handed (one per compilation)."""

    def __init__(self, name: str, **options) -> None:
        self.compile = torch._dynamo.lookup_backend(name)
        self.options = options
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self.compile(graph, example_inputs, **self.options)


# -- the runner-facing object --------------------------------------------------------------


@dataclass
class WarmUp:
    """What ``warm_up`` did: wall time, graphs compiled, and the largest deviations from
    eager over the example batches (absolute: eV for energies, eV/A for forces)."""

    seconds: float
    compilations: int
    max_energy_error: float
    max_force_error: float


class CompiledModel(torch.nn.Module):
    """A model behind a backend, a drop-in for ``CrossfieldMACE`` at inference.

    It is called the same way and has the ``config``, ``dtype``, ``metadata`` and buffers
    that the server reads. Do not convert it (``.to``): compiled graphs are built for one
    dtype and device; call ``compile_model`` again instead. ``training=True`` calls go to
    the eager module: training needs the graph kept for a second backward pass.
    """

    def __init__(
        self,
        model: CrossfieldMACE,
        backend: str,
        shapes: str,
        cache_dir: Path | None,
        reference: CrossfieldMACE | None = None,
    ):
        super().__init__()
        self.model = model
        self.backend = backend
        self.shapes = shapes
        self.cache_dir = cache_dir
        # What warm-up checks against: the module itself, or the e3nn original of a
        # converted one (cueq).
        self._eager = inference_step(reference if reference is not None else model)
        self._counter: _CountingBackend | None = None
        self._traced: torch.jit.ScriptModule | None = None
        self.loaded_from_cache = False  # script, aot: the artefact came from cache_dir
        self._step: Step | None = None
        self._graphs: set[bool] = set()  # compiled graphs, by "with forces and stress"
        self.sealed = False  # after warm_up: only warmed graphs run compiled
        # Calls that would have recompiled after warm-up and ran eager instead.
        self.eager_fallbacks = 0
        # On CUDA, the static shapes of size buckets are replayed as CUDA graphs, one per
        # bucket: a small batch (one MD step of a molecule) is then one graph launch
        # instead of hundreds of kernel launches, which would bound its latency.
        self.cuda_graphs = (
            backend == "compile" and shapes == "buckets" and self.device.type == "cuda"
        )
        if backend in ("eager", "cueq"):
            self._step = inference_step(model)
        elif backend == "compile":
            patches = {"triton.cudagraphs": True} if self.cuda_graphs else {}
            self._counter = _CountingBackend("inductor", config_patches=patches)
            # dynamic=None: only the dimensions mark_dynamic names are symbolic (dynamic=True
            # would make every one so, and Inductor's index simplification then takes hours).
            dynamic = None if shapes == "dynamic" else False
            self._step = torch.compile(
                inference_step(model), backend=self._counter, dynamic=dynamic
            )

    # The attributes the runner and the batcher read from a model.
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.e0s.device

    @property
    def metadata(self) -> dict:
        return getattr(self.model, "metadata", {})

    @property
    def compilations(self) -> int:
        """Graphs compiled so far (traces for ``script``); constant after warm-up."""
        if self._counter is not None:
            return self._counter.graphs
        if self.backend == "aot":
            return int(self._step is not None and not self.loaded_from_cache)
        return int(self._traced is not None)

    def forward(
        self,
        batch: GraphBatch,
        compute_forces: bool = True,
        compute_stress: bool = False,
        training: bool = False,
    ) -> Outputs:
        if training:
            return self.model(batch, compute_forces, compute_stress, training=True)
        if self.backend == "script" and self._traced is None:
            self._trace(batch)
        if self.backend == "aot" and self._step is None:
            self._load_aot(batch)
        gradients = compute_forces or compute_stress
        with torch.set_grad_enabled(gradients):
            if self._counter is None:
                return self._step(batch, compute_forces, compute_stress)
            if self.sealed and gradients not in self._graphs:
                # Not compiled at warm-up: eager, rather than a compiler on a request's path.
                return self._eager(batch, compute_forces, compute_stress)
            padded = self._pad(batch)
            # Forces always come with the stress: one graph instead of two halves the
            # compile time, and the strain costs nothing measurable at run time.
            if self.cuda_graphs:  # the last replay's outputs were copied out: reuse them
                torch.compiler.cudagraph_mark_step_begin()
            # Once sealed, a guard that fails (a global state or an input the warm-up did
            # not foresee) must not put a compiler on a request's path: that call runs
            # eager instead, and the reason is logged.
            patches = {**COMPILE_CONFIG, "error_on_recompile": self.sealed}
            try:
                with torch._dynamo.config.patch(**patches):  # thread-local
                    out = self._step(padded, gradients, gradients)
            except torch._dynamo.exc.RecompileError as err:
                self._note_fallback(err)
                return self._eager(batch, compute_forces, compute_stress)
            if self.cuda_graphs:  # a replay overwrites its outputs: keep ours
                out = {name: value.clone() for name, value in out.items()}
            self._graphs.add(gradients)
        if not compute_stress:
            out = {name: value for name, value in out.items() if name not in STRESS_OUTPUTS}
        return unpad(out, batch.num_atoms, batch.num_structures)

    def _note_fallback(self, err: Exception) -> None:
        self.eager_fallbacks += 1
        if self.eager_fallbacks == 1 or math.log2(self.eager_fallbacks).is_integer():
            log.warning(
                "backend %r: %d call(s) ran eager rather than recompile after warm-up; "
                "the latest because %s",
                self.backend,
                self.eager_fallbacks,
                str(err),  # not the exception: a handler keeping records would keep its frames
            )

    def _pad(self, batch: GraphBatch) -> GraphBatch:
        n, e, b = batch.num_atoms, batch.num_edges, batch.num_structures
        if self.shapes == "dynamic":
            padded = pad_batch(batch, n + 2, e + 2, b + 1, self.config.r_max)
            mark_dynamic(padded)
            return padded
        return pad_batch(
            batch, bucket(n + 2, 16), bucket(e + 2, 64), bucket(b + 1, 2), self.config.r_max
        )

    def warm_up(
        self,
        example_batches: Sequence[GraphBatch] | None = None,
        property_sets: Sequence[tuple[bool, bool]] = PROPERTY_SETS,
    ) -> WarmUp:
        """Compile for every (compute_forces, compute_stress) in ``property_sets`` and
        check each example against eager; raises ``RuntimeError`` on a disagreement.

        Afterwards the model is sealed: a call whose graph was not compiled here (energies
        alone after warming only forces) runs eager instead of compiling then.

        Without examples, :func:`default_example_batches` makes some from the model's elements.
        Give at least two batches of different sizes: the second makes every piece of a
        split graph dynamic (see ``mark_dynamic``) and shows that sizes do not recompile.
        """
        if example_batches is None:
            example_batches = default_example_batches(self.model)
        start = time.perf_counter()
        energy_error = force_error = 0.0
        for compute_forces, compute_stress in property_sets:
            for index, batch in enumerate(example_batches):
                got = self(batch, compute_forces, compute_stress)
                with torch.set_grad_enabled(compute_forces or compute_stress):
                    want = self._eager(batch, compute_forces, compute_stress)
                errors = {
                    name: (got[name] - want[name]).abs().max().item() if want[name].numel() else 0.0
                    for name in want
                }
                energy_error = max(energy_error, errors["energy"])
                force_error = max(force_error, errors.get("forces", 0.0))
                self._check(index, want, errors)
        self.sealed = True
        return WarmUp(time.perf_counter() - start, self.compilations, energy_error, force_error)

    def _check(self, index: int, want: Outputs, errors: dict[str, float]) -> None:
        """Fail loudly when a backend's numbers leave the round-off band around eager."""
        relative = 1e-8 if self.dtype == torch.float64 else 1e-3
        for name, error in errors.items():
            scale = want[name].abs().max().item() if want[name].numel() else 0.0
            if not error <= relative * max(scale, 1.0):
                raise RuntimeError(
                    f"backend {self.backend!r}: {name} of example batch {index} differs from "
                    f"eager by {error:.3g} (scale {scale:.3g}, allowed {relative:g} relative)"
                )

    def _load_aot(self, batch: GraphBatch) -> None:
        """Load the package matching the model from the cache, or compile it there."""
        from .aot import load_or_build

        n, e, b = batch.num_atoms, batch.num_edges, batch.num_structures
        example = pad_batch(batch, n + 2, e + 2, b + 1, self.config.r_max)
        self._step, built = load_or_build(self.model, example, self.cache_dir)
        self.loaded_from_cache = not built

    def _trace(self, batch: GraphBatch) -> None:
        """Load the traced module from the cache, or trace ``batch`` and store it."""
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"script-{model_fingerprint(self.model)}.pt"
            if path.exists():
                self._traced = torch.jit.load(str(path), map_location=self.device)
                self.loaded_from_cache = True
        if self._traced is None:
            positions = batch.positions.detach().requires_grad_(True)
            strain = positions.new_zeros(batch.num_structures, 3, 3).requires_grad_(True)
            with warnings.catch_warnings():
                # The tracer warns about loops over fixed-size tensors (edge_index rows,
                # ZBL coefficients) and shapes of buffers: constants in every batch.
                # warm_up checks the trace against eager on batches of other sizes.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._traced = torch.jit.trace(
                    _StrainedEnergy(self.model),
                    _script_arguments(batch, positions, strain),
                    check_trace=False,
                )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(f".{os.getpid()}.tmp")
                torch.jit.save(self._traced, str(temporary))
                temporary.replace(path)
        self._step = script_step(self._traced)


def model_fingerprint(model: CrossfieldMACE) -> str:
    """A hash of everything a compiled artefact depends on: code versions, config, weights."""
    digest = hashlib.sha256()
    digest.update(torch.__version__.encode())
    digest.update(str(model.dtype).encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def compile_model(
    model: CrossfieldMACE,
    backend: str = "eager",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | Path | None = None,
    shapes: str = "dynamic",
) -> CompiledModel:
    """``model`` behind ``backend``, in ``dtype`` on ``device``; call ``warm_up`` next.

    The model is copied (parameters frozen), so the caller's module is left as it was.
    Raises ``BackendUnavailableError`` when the backend cannot run here, ``ValueError`` for
    unknown names or a model the backend cannot represent.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    if shapes not in SHAPES:
        raise ValueError(f"shapes: unknown mode {shapes!r}; choose one of {SHAPES}")
    device = torch.device(device) if device is not None else model.e0s.device
    dtype = dtype or model.dtype
    cache = Path(cache_dir) if cache_dir is not None else None
    if backend == "auto":
        backend = ready_backend(model, dtype, device, cache)
    if backend == "aot":
        from .aot import check_exportable

        check_exportable(model)
    if backend == "cueq":
        from .backends_cueq import CueqUnavailableError, kernel_method

        try:
            method = kernel_method(device)
        except CueqUnavailableError as err:
            raise BackendUnavailableError(str(err)) from None
    if backend == "script" and model.config.product == "element":
        raise ValueError(
            "backend: 'script' cannot trace per-element product weights (config.product = "
            "'element'): their atom blocks depend on each batch's composition, which a trace "
            "would freeze; use 'compile' or 'eager'"
        )
    inference = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    inference.requires_grad_(False)
    inference.metadata = dict(getattr(model, "metadata", {}))
    if backend == "cueq":
        from .backends_cueq import cueq_model

        return CompiledModel(cueq_model(inference, method), backend, shapes, cache, inference)
    if cache is not None and backend == "compile":
        # Inductor reads this on every cache access; content-addressed, so shared by models.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    if backend == "compile":
        scalar_buffers_as_vectors(inference)
        # One entry per model and property set on the shared inference_step code object.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
    return CompiledModel(inference, backend, shapes, cache)


def ready_backend(
    model: CrossfieldMACE, dtype: torch.dtype, device: torch.device, cache: Path | None
) -> str:
    """What ``auto`` runs: ``aot`` when ``cache`` holds the package of ``model`` in
    ``dtype`` on ``device``'s kind, else ``eager``."""
    from .aot import artefact_name

    # No package folder: eager at once (the key needs Inductor's CPU probe, ~1 s once).
    if cache is None or model.config.product == "element" or not (cache / "aot").is_dir():
        return "eager"
    converted = model if (model.dtype, model.e0s.device) == (dtype, device) else None
    if converted is None:
        converted = copy.deepcopy(model).to(device=device, dtype=dtype)
    return "aot" if (cache / "aot" / artefact_name(converted, device)).exists() else "eager"


def default_cache_dir() -> Path:
    """Where compiled artefacts live unless told otherwise: one cache per user, shared by
    ``crossfield compile``, ``crossfield serve`` and ``CrossfieldCalculator``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crossfield"


def scalar_buffers_as_vectors(model: torch.nn.Module) -> None:
    """Give 0-d floating buffers (r_max, Bessel prefactor, ZBL constants) shape [1].

    The values, and every result they broadcast into, are unchanged. torch.compile turns
    a 0-d float64 CPU tensor into a symbolic Python float, finds it specialised during
    graph capture and restarts the whole analysis: 40 % more compile time in float64.
    """
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dim() == 0 and buffer.is_floating_point():
                setattr(module, name, buffer.reshape(1))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` on this machine."""
    from .backends_cueq import CueqUnavailableError, kernel_method

    try:
        kernel_method(torch.device(device))
    except CueqUnavailableError:
        return ["eager", "compile", "script", "aot"]
    return ["eager", "compile", "script", "cueq", "aot"]


# -- example batches for warm-up -----------------------------------------------------------


def example_structures(model: CrossfieldMACE) -> list[Structure]:
    """A small crystal and one cluster per head over the model's elements.

    Any batch compiles the dynamic graph; these only need every code path: periodic and
    open boundaries, several heads in one batch, edges across the cell boundary, and every
    head, so that a backend wrong for one head (cuEquivariance's known failure) is caught.
    """
    config = model.config
    elements = np.asarray(config.elements)
    spacing = 0.45 * config.r_max
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(0)
    crystal = Structure(
        numbers=elements[np.arange(8) % len(elements)],
        positions=grid * spacing + rng.normal(0, 0.05, (8, 3)),
        cell=np.eye(3) * 2 * spacing,
        pbc=(True, True, True),
        head=config.head_names[0],
    )
    clusters = []
    for shift, head in enumerate(config.head_names):
        size = (3, 5)[shift % 2]
        clusters.append(
            Structure(
                numbers=elements[(np.arange(size) + shift) % len(elements)],
                positions=grid[:size] * spacing * 0.6 + rng.normal(0, 0.05, (size, 3)),
                head=head,
            )
        )
    return [crystal, *clusters]


def default_example_batches(model: CrossfieldMACE) -> list[GraphBatch]:
    """Two batches of different sizes: the second checks that sizes do not recompile."""
    config = model.config
    crystal, first, *others = example_structures(model)
    return [
        build_batch(
            structures,
            config.elements,
            config.r_max,
            config.head_names,
            model.dtype,
            model.e0s.device,
        )
        for structures in ([crystal, first], [*others, crystal, first, first])
    ]
