"""GIL contention: why a server's runner computes slower than the same model alone.

The server runs its model on a runner thread and its gRPC I/O on an event-loop thread of
the same process. This measures what sharing a process costs a batched evaluation (the
default model, small molecules in batches of 16, as under 32 clients), side by side:

- ``alone``: the evaluation by itself;
- ``beside a busy process``: another process spinning in Python (competes for a core);
- ``beside a thread``: a thread in this process that holds the GIL ``--duty`` of the time
  in bursts of ``--burst-ms`` (what the I/O loop does per request; measured ~0.5 ms each);
- ``beside a spinning thread``: a thread that never lets go of the GIL voluntarily.

Ratios > 1 mean slower than alone. On a CPU the eager model's Python dispatch holds the
GIL between its kernels, so any other Python thread delays every kernel launch.

Usage: python bench/gil_contention.py [--batches 24] [--duty 0.13] [--burst-ms 0.5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import in_process, load_model, workload  # noqa: E402


def beside_thread(run, burst: float, rest: float) -> float:
    """``run()``'s result while a thread holds the GIL for ``burst`` s every ``rest`` s."""
    stop = threading.Event()

    def pester() -> None:
        while not stop.is_set():
            until = time.perf_counter() + burst
            while time.perf_counter() < until:
                pass
            if rest:
                time.sleep(rest)

    thread = threading.Thread(target=pester, daemon=True)
    thread.start()
    try:
        return run()
    finally:
        stop.set()
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=24, help="batches of 16 molecules")
    parser.add_argument("--duty", type=float, default=0.13, help="GIL share of the thread")
    parser.add_argument("--burst-ms", type=float, default=0.5, help="length of its bursts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model("default", torch.float32)
    structures = workload("molecules", 16 * args.batches, clients=32)
    in_process(model, structures[:16], 16)  # warm up

    def run() -> float:
        return in_process(model, structures, 16)

    alone = run()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy_process = run()
    finally:
        spinner.kill()
        spinner.wait()
    burst = args.burst_ms / 1e3
    thread = beside_thread(run, burst, burst * (1 - args.duty) / args.duty)
    few = structures[:16]
    alone_few = in_process(model, few, 16)
    spinning = beside_thread(lambda: in_process(model, few, 16), 1.0, 0.0)
    print(f"batched evaluation alone: {alone:.1f} structures/s; time relative to alone:")
    print(f"  beside a busy process:              {alone / busy_process:.2f}")
    print(
        f"  beside a thread holding the GIL {args.duty:.0%} "
        f"({args.burst_ms} ms bursts): {alone / thread:.2f}"
    )
    print(f"  beside a thread spinning in Python: {alone_few / spinning:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
