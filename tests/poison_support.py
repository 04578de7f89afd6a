"""Real servers that poison structures take down, for the client's poison control.

``python tests/poison_support.py`` runs the real ``InferenceServer`` (small model, loopback,
an ephemeral port it prints) with one fault injected where every structure enters a
batcher: a chain of ``KILLER_ATOMS`` hydrogen atoms kills the process with SIGKILL, as a
structure that crashes the neighbour list did before graph building was isolated (issue
15: one such structure took down 3 of 3 replicas through client retries). A chain of
``MARKED_ATOMS`` hydrogen atoms is refused with the server's own ``PoisonError``, as the
isolated graph workers refuse a structure that crashed or stalled them. Everything else
is served normally.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

KILLER_ATOMS = 11
MARKED_ATOMS = 13
MARK_REASON = "graph building crashed its worker process (signal 8)"
MARKED_LINE = "refused a marked structure"  # printed each time one arrives


def hydrogen_chain(count: int) -> Atoms:
    """``count`` hydrogen atoms 1 A apart on a line: a valid molecule."""
    return Atoms("H" * count, positions=np.arange(count)[:, None] * [1.0, 0.0, 0.0])


@dataclass
class PoisonedServer:
    """One server process and what it printed."""

    process: subprocess.Popen
    port: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def died_within(self, seconds: float) -> bool:
        """Whether the process ended, waiting up to ``seconds`` for one that is going (a
        client can see a killed server's socket close before its parent can reap it)."""
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True


@contextmanager
def poisoned_servers(count: int) -> Iterator[list[PoisonedServer]]:
    """``count`` such servers started side by side; killed at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ExitStack() as stack:
        servers = []
        for _ in range(count):
            process = subprocess.Popen(
                [sys.executable, __file__],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            stack.callback(_kill, process)
            servers.append(PoisonedServer(process))
        for server in servers:
            _wait_listening(server)
        yield servers


def _wait_listening(server: PoisonedServer) -> None:
    for line in server.process.stdout:
        server.output.append(line)
        match = re.match(r"listening on port (\d+)", line)
        if match:
            server.port = int(match.group(1))
            break
    else:
        raise RuntimeError("poisoned server exited before listening:\n" + "".join(server.output))
    threading.Thread(
        target=lambda: server.output.extend(server.process.stdout), daemon=True
    ).start()


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from client_support import small_model

    from crossfield.server.app import InferenceServer, ServerConfig
    from crossfield.server.batcher import BatchLimits
    from crossfield.server.errors import PoisonError

    torch.set_num_threads(1)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        device="cpu",
        dtype=torch.float64,
        limits=BatchLimits(max_delay=0.002),
        grace=1.0,
    )
    server = InferenceServer(config)
    served = server.add_model(small_model(), "small", "1")
    submit = served.batcher.submit

    def submit_or_die(item, *args, **kwargs):
        numbers = np.asarray(item.request.structure.numbers)
        if len(numbers) == KILLER_ATOMS and (numbers == 1).all():
            os.kill(os.getpid(), signal.SIGKILL)
        if len(numbers) == MARKED_ATOMS and (numbers == 1).all():
            print(MARKED_LINE, flush=True)
            raise PoisonError(MARK_REASON)
        return submit(item, *args, **kwargs)

    served.batcher.submit = submit_or_die
    server.start()
    print(f"listening on port {server.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
