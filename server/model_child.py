"""Launch the model process and talk to it (``model_process.py`` is the rest).

This module imports neither torch nor the model, so that ``crossfield serve`` can launch
the child before its own heavy imports: the two processes then import torch and e3nn side
by side (seconds each) instead of one after the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

CHILD_MODULE = "crossfield.server.model_process"  # its ``__main__`` serves the parent


class ModelProcessError(RuntimeError):
    """A call the child could not carry out: its own exception, by type and message, or
    the child's death."""


class Channel:
    """One end of a socket pair to the child: a request, then its reply, one at a time."""

    def __init__(self, child: Child, ours: socket.socket) -> None:
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


class Child:
    """One child process: ``python -m crossfield.server.model_process`` with two socket
    pairs, one for evaluations (the runner's thread sends a batch and reads its outputs
    itself: no thread between it and the child) and one for loading versions (a compile
    there does not hold up evaluations). ``threads``: its torch threads, 0 for torch's
    default (the parent's, on the same machine).

    Not a ``multiprocessing`` child: spawning one of those runs the parent's ``__main__``
    again (a user's script, a notebook), and forking would copy the server's threads. It
    sees the parent's ``sys.path``, so whatever module a model's pickle names imports there.
    """

    def __init__(self, threads: int) -> None:
        pairs = [socket.socketpair() for _ in range(2)]
        fds = [theirs.fileno() for _, theirs in pairs]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", CHILD_MODULE, *map(str, fds), str(threads)]
        # A session of its own: a Ctrl-C in the server's terminal goes to the terminal's
        # process group, and the server, not the child, decides when the child ends.
        self.process = subprocess.Popen(command, pass_fds=fds, env=env, start_new_session=True)
        for _, theirs in pairs:
            theirs.close()
        self.evaluations = Channel(self, pairs[0][0])
        self.control = Channel(self, pairs[1][0])
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
        """End the child once it has finished what it holds (it reads the end after its
        imports, so a child still importing takes those seconds to go)."""
        self.evaluations.close()
        self.control.close()
        try:
            self.process.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def discard(self) -> None:
        """End a child that holds nothing now, without waiting for its imports."""
        self._death = "discarded unused"
        self.process.kill()
        self.process.wait()
        self.evaluations.close()
        self.control.close()
