"""The floor of gRPC itself for an MD driver: a bare ``grpc.aio`` echo stream, no model.

An MD driver sends a step, the server works on it, answers, and the driver sends the next
step. Between steps every thread on the path sleeps (the driver's, gRPC's pollers, the
server's event loop), and on a virtual machine waking a sleeping thread is not free. This
measures, on one bidirectional stream, what a step costs beyond the server's own work:

- ``at once``: the server echoes each message immediately (the floor usually quoted);
- ``after N ms of work``: it spins the CPU for N ms (Python, or small torch matmuls, as a
  model would) before echoing; the time beyond that work is what the wire costs an MD step.

The server runs in another process, like ``crossfield serve``; the client uses the sync
API with a request queue, as ``Client.session`` does. Medians of ``--steps`` steps.
``bench/md_latency.py`` compares the whole server against this floor.

Usage: python bench/grpc_floor.py [--steps 800] [--work-ms 13]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import queue
import time

import grpc
import numpy as np

METHOD = "/floor.Echo/Stream"


def _work(milliseconds: float, kind: str, matrix) -> None:
    end = time.perf_counter() + milliseconds / 1e3
    while time.perf_counter() < end:
        if kind == "torch":
            matrix @ matrix


def _serve(ports: multiprocessing.Queue, milliseconds: float, kind: str) -> None:
    import torch

    torch.set_num_threads(1)
    matrix = torch.randn(64, 64)

    async def stream(requests, context) -> None:
        async for _ in requests:
            start = time.perf_counter()
            _work(milliseconds, kind, matrix)
            await context.write(repr(time.perf_counter() - start).encode().ljust(400))

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(stream)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("floor.Echo", {"Stream": handler}),)
        )
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def beyond_work(milliseconds: float, kind: str, steps: int) -> float:
    """Median seconds per step beyond the server's work, on a fresh server process."""
    ports: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(ports, milliseconds, kind), daemon=True
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get()}")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    answers = channel.stream_stream(METHOD)(iter(requests.get, None))
    message = b"x" * 400  # about an 8-atom step
    times = []
    for step in range(steps + 50):
        start = time.perf_counter()
        requests.put(message)
        worked = float(next(answers).strip())
        if step >= 50:
            times.append(time.perf_counter() - start - worked)
    requests.put(None)
    channel.close()
    server.terminate()
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--work-ms", type=float, default=13.0, help="server work per step")
    args = parser.parse_args()
    floor = beyond_work(0.0, "spin", args.steps)
    print(f"at once: {1e3 * floor:.3f} ms per step")
    for kind in ("spin", "torch"):
        cost = beyond_work(args.work_ms, kind, args.steps)
        print(
            f"after {args.work_ms:g} ms of {kind} work: {1e3 * cost:.3f} ms per step beyond "
            f"the work ({cost / floor:.1f}x the at-once floor)"
        )


if __name__ == "__main__":
    main()
