"""When a structure is evaluated on the I/O loop's own thread instead of the runner's.

The normal road of a structure is two thread hand-offs: the I/O loop queues it and wakes
the runner's thread, which evaluates it and wakes the loop with the answer; each wake-up
costs a futex and a turn at the interpreter lock. For an MD driver alone on a server
they are a sizeable part of what the server adds to a step: measured on this project's
2-core CPU with per-step timestamps (8 atoms), ~0.1 ms from queueing to the runner taking
the step and 0.26-0.38 ms from its answer to the loop resuming, of ~2 ms beyond the model
(about half of which is gRPC's own floor, ``bench/grpc_floor.py``). Run here, the two
became ~0.16 ms; and the default model itself ran faster on the loop's thread than on the
runner's (8 atoms: 15.6-16.4 against 16.5-25 ms, three alternating pairs).

When nobody else can be served meanwhile, the step may as well run where it arrived: it
is the only call open on the server that carries work, the device is idle and nothing is
queued (``Batcher.submit(lone=True)`` checks the last two under its lock). Other calls
that arrive meanwhile wait in gRPC's buffers until the loop is back -- at most as long as
they would have waited for the busy device -- and then take the normal road, batched. The
step is bounded (``HERE_MAX_EDGES``), so the loop is never away for long: a 64-atom Si
crystal (~1800 edges) takes the default model ~70 ms eager on this CPU, the bound about
twice that. A lone step beyond it (64 atoms of Cu: ~4.9k edges) takes the runner's thread,
but like the ones here it runs with the server's own copy of an eager model, not in a
model process: alone, nobody contends for the interpreter lock, and the hop to the child
cost such steps 8-10 ms (80 and 92 against 69 and 84 ms, two alternating pairs).

Only MD sessions take this road: a lone session stays lone from step to step, whereas the
first of many unary calls arriving together looks lone until the others have been read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

HERE_MAX_EDGES = 4096  # estimated edges of a structure that may run on the I/O loop


class OpenCalls:
    """How many calls that carry structures are open on the server (used on the I/O
    loop only: Compute, ComputeStream, ComputeSession and Relax)."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def open(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    @property
    def lone(self) -> bool:
        """Whether one call is open: its structure may run on the loop's thread (if it is
        within ``HERE_MAX_EDGES``, the device is idle and nothing is queued)."""
        return self.count == 1
