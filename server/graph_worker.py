"""A graph worker: a process that builds neighbour lists for the server, so that an input
that crashes or stalls the neighbour list takes only this process with it.

Run as ``python -m crossfield.server.graph_worker PATH`` where PATH is
``crossfield/model/neighbours.py``, loaded on its own: importing ``crossfield.model`` would
import torch (seconds and ~300 MB per worker, paid again after every kill), and the worker
needs numpy and vesin only.

The protocol on stdin/stdout is raw little-endian arrays, never pickle (the server must not
unpickle what a process fed with strangers' input writes):

* once ready, the worker writes ``b"R"``;
* request: int64 count, then ``count`` float64 values
  ``[r_max, periodic (3), box (9), positions (3n)]``;
* reply: int64 status and int64 length; status 0: ``length`` = E edges, followed by
  5E int64 (senders, receivers, then the [E, 3] unit shifts); status 1: ``length`` bytes of
  UTF-8, the message of the ``NeighbourListError`` that refused the input.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import numpy as np

READY = b"R"
OK, REFUSED = 0, 1


def load_neighbours(path: str) -> ModuleType:
    """``crossfield.model.neighbours`` from its file, without its package (no torch)."""
    spec = importlib.util.spec_from_file_location("crossfield_graph_worker_neighbours", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(neighbours: ModuleType, requests, replies) -> None:
    """Answer requests from the binary stream ``requests`` until it ends."""
    replies.write(READY)
    replies.flush()
    while header := requests.read(8):
        count = int(np.frombuffer(header, "<i8")[0])
        values = np.frombuffer(requests.read(8 * count), "<f8")
        r_max, periodic, box = values[0], values[1:4] > 0, values[4:13].reshape(3, 3)
        positions = values[13:].reshape(-1, 3)
        frame = neighbours.Frame(positions, np.zeros(positions.shape, np.int64), box, periodic)
        try:
            sender, receiver, shifts = neighbours.frame_pairs(frame, float(r_max))
        except neighbours.NeighbourListError as err:
            message = str(err).encode()
            replies.write(np.array([REFUSED, len(message)], "<i8").tobytes() + message)
        else:
            replies.write(np.array([OK, len(sender)], "<i8").tobytes())
            for array in (sender, receiver, shifts):
                replies.write(np.ascontiguousarray(array, "<i8").tobytes())
        replies.flush()


def main() -> None:
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not corrupt the replies
    serve(load_neighbours(sys.argv[1]), sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
