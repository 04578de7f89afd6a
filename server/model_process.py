"""Evaluate a CPU server's models in a process of their own (``crossfield serve --model-process``).

Why: on a CPU the model and the server's I/O share one interpreter lock (GIL). The eager
model holds it between kernels (Python dispatch), the I/O loop holds it ~0.5 ms per request,
and each waits for the other: a thread holding the GIL 13 % of the time slows an in-process
batched evaluation by 11-43 %, a busy *process* beside it by 0-11 %
(``bench/gil_contention.py``). So the model runs here, in a child process with its own
interpreter, and the server process keeps everything else (I/O, validation, batching, graph
building).

What crosses the pipe: each model version once (the eager module, pickled; the child
compiles it for its backend and warms it up, so a version that fails there is refused as
it would be in-process), then per batch its graph's arrays one way and the outputs the other
(a few kB for a batch of molecules: ~0.1 ms). The server keeps its own eager copy for
everything that is not evaluation: config, graph building, collation.

A child that dies (killed, out of memory, a crash in a kernel) fails the calls it was
running, so the runner splits that batch as it does any failed one; the next call starts a
new child and loads every version it held again (``restarts`` counts them).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, GraphBatch

from .model_child import Child, ModelProcessError

log = logging.getLogger(__name__)

OUTPUTS = ("energy", "node_energy", "forces", "stress")  # what the runner reads of a result


@dataclass(frozen=True)
class ModelSpec:
    """Everything the child needs to hold one model version (again, after a restart)."""

    module: bytes  # the eager model, pickled with torch.save
    backend: str  # a resolved crossfield.model.backends name (never "auto")
    dtype: str
    cache_dir: str | None
    shapes: str


class ModelProcess:
    """The child process that evaluates one CPU runner's models (parent side).

    ``load`` and ``drop`` come from loading threads, ``evaluate`` from whichever thread
    holds the runner's device (its own, or the I/O loop's for a lone session step); they
    may overlap (a version compiles in the child while another serves).

    ``child``: one launched already (``model_child.Child``), which ``crossfield serve``
    does before its own imports; else the first model given starts one."""

    def __init__(
        self,
        threads: int | None = None,
        on_restart: Callable[[], None] | None = None,
        skipped: frozenset[str] = frozenset(),
        child: Child | None = None,
    ) -> None:
        self.threads = threads or torch.get_num_threads()
        self.restarts = 0
        self.skipped = skipped  # backends whose models stay in the server's process
        self._on_restart = on_restart  # e.g. a Prometheus counter's inc
        self._lock = threading.Lock()  # the child's lifecycle and the model table
        self._models: dict[str, ModelSpec] = {}
        self._loading = 0  # loads under way, whose models are not in the table yet
        self._keys = itertools.count()
        self._closed = False
        self._child = child

    def evaluates(self, backend: str) -> bool:
        """Whether models compiled for ``backend`` (resolved) are evaluated here."""
        return backend not in self.skipped

    @property
    def pid(self) -> int | None:
        """The child's process id; None when there is none (no model started it)."""
        with self._lock:
            return None if self._child is None else self._child.process.pid

    def load(self, spec: ModelSpec) -> tuple[str, dict[str, Any]]:
        """Have the child hold the model of ``spec``; returns its key there and the
        child's report (``compile_seconds``). Raises ``ModelProcessError`` naming
        the child's error (a backend that cannot run it, non-finite warm-up)."""
        key = f"m{next(self._keys)}"
        with self._lock:
            self._loading += 1
        try:
            report = self._current().control.call(("load", key, spec))
            with self._lock:
                self._models[key] = spec
        finally:
            with self._lock:
                self._loading -= 1
        return key, report

    def release_idle(self) -> None:
        """End a child that holds no model, one launched ahead for models that then stayed
        in the server's process (AOT packages); a later ``load`` starts another."""
        with self._lock:
            child = self._child
            if child is None or self._models or self._loading:
                return
            self._child = None
        child.discard()
        log.info("model process: no model evaluates there; ended it until one does")

    def drop(self, key: str) -> None:
        """Let the child free a retired version."""
        with self._lock:
            self._models.pop(key, None)
            child = self._child
        if child is not None and child.alive:
            with contextlib.suppress(ModelProcessError):
                child.control.call(("drop", key))

    def evaluate(
        self, key: str, graph: GraphBatch, compute_forces: bool, compute_stress: bool
    ) -> dict[str, torch.Tensor]:
        """The model's outputs for ``graph`` (on the CPU), as a model call would give them."""
        arrays = {name: value.numpy() for name, value in vars(graph).items()}
        message = (key, arrays, compute_forces, compute_stress)
        outputs = self._current().evaluations.call(message)
        return {name: torch.from_numpy(value) for name, value in outputs.items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._child is not None:
                self._child.close()

    def _current(self) -> Child:
        """The live child (started on first use): a dead one is replaced, and given every
        model it held."""
        with self._lock:
            if self._child is None:
                if self._closed:
                    raise ModelProcessError("the model process is closed")
                self._child = Child(self.threads)
                return self._child
            if self._child.alive or self._closed:
                return self._child
            self.restarts += 1
            if self._on_restart is not None:
                self._on_restart()
            log.warning(
                "model process: starting a new one (restart %d), loading %d model(s)",
                self.restarts,
                len(self._models),
            )
            self._child = Child(self.threads)
            for key, spec in self._models.items():
                try:
                    self._child.control.call(("load", key, spec))
                except ModelProcessError as err:
                    log.error("model process: %s failed to load again: %s", key, err)
            return self._child


class ProcessModel:
    """A model version held by a ``ModelProcess``, called as the model itself is."""

    def __init__(self, process: ModelProcess, key: str) -> None:
        self.process = process
        self.key = key

    def __call__(
        self, graph: GraphBatch, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        return self.process.evaluate(self.key, graph, compute_forces, compute_stress)


def pickle_model(model: CrossfieldMACE) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


# -- the child ---------------------------------------------------------------------------
def child_main(evaluations: Connection, control: Connection, threads: int) -> None:
    """Serve the parent until it sends None or goes away: evaluations on this thread, one
    after another (the runner sends one batch at a time), loads on a thread of their own,
    so that a new version compiles while the one serving goes on.

    SIGINT and SIGTERM are ignored: a signal meant for the server (systemd's stop signals
    every process of the service) must not end the child under a batch the server is
    still draining; the server stops it once drained, and its death ends the child too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if threads > 0:  # else torch's default, as in the parent
        torch.set_num_threads(threads)
    models: dict[str, Any] = {}
    threading.Thread(target=serve_control, args=(control, models), daemon=True).start()
    while True:
        try:
            message = evaluations.recv()
        except (EOFError, OSError):
            return  # the server went away
        if message is None:
            return
        key, arrays, compute_forces, compute_stress = message
        try:
            reply = (True, run(models[key], arrays, compute_forces, compute_stress))
        except Exception as err:
            reply = (False, f"{type(err).__name__}: {err}")
        evaluations.send(reply)


def serve_control(control: Connection, models: dict[str, Any]) -> None:
    """Load (compile, warm up) and drop versions as the parent asks."""
    while True:
        try:
            message = control.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        kind, key, *spec = message
        try:
            if kind == "load":
                models[key], reply = build(*spec)
            else:
                models.pop(key, None)
                reply = None
        except Exception as err:
            control.send((False, f"{type(err).__name__}: {err}"))
            continue
        control.send((True, reply))


def build(spec: ModelSpec) -> tuple[Any, dict[str, Any]]:
    """The servable model of ``spec``, compiled and warmed up as ``serve_model`` does."""
    from .models import ready_to_serve

    model = torch.load(io.BytesIO(spec.module), weights_only=False).eval()
    dtype = getattr(torch, spec.dtype)
    model, seconds = ready_to_serve(model, spec.backend, dtype, "cpu", spec.cache_dir, spec.shapes)
    return model, {"compile_seconds": seconds}


def run(
    model: Any, arrays: dict[str, np.ndarray], compute_forces: bool, compute_stress: bool
) -> dict[str, np.ndarray]:
    graph = GraphBatch(**{name: torch.from_numpy(value) for name, value in arrays.items()})
    with torch.set_grad_enabled(compute_forces):
        out = model(graph, compute_forces=compute_forces, compute_stress=compute_stress)
    return {name: out[name].detach().numpy() for name in OUTPUTS if name in out}


if __name__ == "__main__":
    child_main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])), int(sys.argv[3]))
    # Not the interpreter's teardown: with the loading thread still blocked in a read,
    # torch's thread pools abort it ("terminate called without an active exception").
    os._exit(0)
