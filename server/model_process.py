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
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, GraphBatch

log = logging.getLogger(__name__)

OUTPUTS = ("energy", "node_energy", "forces", "stress")  # what the runner reads of a result


class ModelProcessError(RuntimeError):
    """A call the child could not carry out: its own exception, by type and message, or
    the child's death."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the child needs to hold one model version (again, after a restart)."""

    module: bytes  # the eager model, pickled with torch.save
    backend: str  # a resolved crossfield.model.backends name (never "auto")
    dtype: str
    cache_dir: str | None
    shapes: str


class _Channel:
    """One end of a socket pair to the child: a request, then its reply, one at a time."""

    def __init__(self, child: _Child, ours: socket.socket) -> None:
        self._child = child
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()

    def call(self, message: Any) -> Any:
        """Send ``message`` and wait for the reply; raises ``ModelProcessError`` with the
        child's error, or when the child dies meanwhile."""
        with self._lock:
            try:
                self._conn.send(message)
                ok, payload = self._conn.recv()
            except (EOFError, OSError):
                raise ModelProcessError(self._child.died()) from None
        if not ok:
            raise ModelProcessError(payload)
        return payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._conn.close()


class _Child:
    """One child process: ``python -m crossfield.server.model_process`` with two socket
    pairs, one for evaluations (the runner's thread sends a batch and reads its outputs
    itself: no thread between it and the child) and one for loading versions (a compile
    there does not hold up evaluations).

    Not a ``multiprocessing`` child: spawning one of those runs the parent's ``__main__``
    again (a user's script, a notebook), and forking would copy the server's threads. It
    sees the parent's ``sys.path``, so whatever module a model's pickle names imports there.
    """

    def __init__(self, threads: int) -> None:
        pairs = [socket.socketpair() for _ in range(2)]
        fds = [theirs.fileno() for _, theirs in pairs]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", __name__, *map(str, fds), str(threads)]
        # A session of its own: a Ctrl-C in the server's terminal goes to the terminal's
        # process group, and the server, not the child, decides when the child ends.
        self.process = subprocess.Popen(command, pass_fds=fds, env=env, start_new_session=True)
        for _, theirs in pairs:
            theirs.close()
        self.evaluations = _Channel(self, pairs[0][0])
        self.control = _Channel(self, pairs[1][0])
        self._death: str | None = None

    @property
    def alive(self) -> bool:
        return self._death is None and self.process.poll() is None

    def died(self) -> str:
        """Why the child is gone (a channel broke): its exit code, once it has exited."""
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # a channel broke under a live child: end it
            self.process.kill()
            code = self.process.wait()
        if self._death is None:
            self._death = f"the model process exited (code {code})"
            log.error(self._death)
        return self._death

    def close(self) -> None:
        self.evaluations.close()
        self.control.close()
        try:
            self.process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ModelProcess:
    """The child process that evaluates one CPU runner's models (parent side).

    ``load`` and ``drop`` come from loading threads, ``evaluate`` from whichever thread
    holds the runner's device (its own, or the I/O loop's for a lone session step); they
    may overlap (a version compiles in the child while another serves)."""

    def __init__(
        self,
        threads: int | None = None,
        on_restart: Callable[[], None] | None = None,
        skipped: frozenset[str] = frozenset(),
    ) -> None:
        self.threads = threads or torch.get_num_threads()
        self.restarts = 0
        self.skipped = skipped  # backends whose models stay in the server's process
        self._on_restart = on_restart  # e.g. a Prometheus counter's inc
        self._lock = threading.Lock()  # the child's lifecycle and the model table
        self._models: dict[str, ModelSpec] = {}
        self._keys = itertools.count()
        self._closed = False
        self._child: _Child | None = None  # started by the first model it is given

    def evaluates(self, backend: str) -> bool:
        """Whether models compiled for ``backend`` (resolved) are evaluated here."""
        return backend not in self.skipped

    @property
    def pid(self) -> int | None:
        """The child's process id; None until a model started it."""
        with self._lock:
            return None if self._child is None else self._child.process.pid

    def load(self, spec: ModelSpec) -> tuple[str, dict[str, Any]]:
        """Have the child hold the model of ``spec``; returns its key there and the
        child's report (``compile_seconds``). Raises ``ModelProcessError`` naming
        the child's error (a backend that cannot run it, non-finite warm-up)."""
        key = f"m{next(self._keys)}"
        report = self._current().control.call(("load", key, spec))
        with self._lock:
            self._models[key] = spec
        return key, report

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

    def _current(self) -> _Child:
        """The live child (started on first use): a dead one is replaced, and given every
        model it held."""
        with self._lock:
            if self._child is None:
                if self._closed:
                    raise ModelProcessError("the model process is closed")
                self._child = _Child(self.threads)
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
            self._child = _Child(self.threads)
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
