"""Neighbour lists for a whole batch: host path, vesin-torch, nvalchemi-toolkit-ops.

    python bench/device_graphs.py [--device cpu|cuda] [--repeats 20] [--json FILE]

Side by side, on the same canonical frames (milliseconds per batch, median): the host path
(``neighbours.frame_pairs`` per structure, numpy vesin), the device path
(``device_graph.device_pairs``: vesin-torch, all molecules in one call), and, where
importable, nvalchemi-toolkit-ops' batched cell list (a Warp library; its first call
compiles kernels, reported apart). Pair counts are checked equal. This measurement chose
vesin-torch for model/device_graph.py (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk, molecule

from crossfield.model.device_graph import device_pairs
from crossfield.model.neighbours import canonical_frame, frame_pairs

R_MAX = 5.0


def batches() -> dict[str, list]:
    ethanol = [molecule("CH3CH2OH") for _ in range(32)]
    for index, atoms in enumerate(ethanol):
        atoms.rattle(0.05, seed=index)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (5, 5, 5)
    copper.rattle(0.05, seed=0)
    return {"ethanol_32": ethanol, "Cu_500": [copper]}


def median_ms(call, repeats: int, device: torch.device) -> float:
    call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def nvalchemi(frames, positions: torch.Tensor):
    """The batched call of nvalchemi-toolkit-ops, or None where it is not installed."""
    try:
        from nvalchemiops.torch.neighbors import neighbor_list
    except ImportError:
        return None
    counts = torch.tensor([len(f.positions) for f in frames])
    ptr = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).int()])
    index = torch.repeat_interleave(torch.arange(len(frames), dtype=torch.int32), counts)
    cells = torch.stack(
        [torch.as_tensor(f.box if f.periodic.any() else np.eye(3) * 100.0) for f in frames]
    )
    pbc = torch.tensor([[bool(f.periodic.any())] * 3 for f in frames])
    device = positions.device
    arguments = dict(
        cell=cells.to(device), pbc=pbc.to(device), batch_idx=index.to(device),
        batch_ptr=ptr.to(device), return_neighbor_list=True,
    )  # fmt: skip
    return lambda: neighbor_list(positions, R_MAX, **arguments)


def measure(name: str, systems: list, repeats: int, device: torch.device) -> dict:
    frames = [canonical_frame(a.positions, a.cell.array, a.pbc, R_MAX) for a in systems]
    offsets = np.concatenate([[0], np.cumsum([len(f.positions) for f in frames])])
    positions = torch.as_tensor(np.concatenate([f.positions for f in frames]), device=device)
    host_pairs = sum(len(frame_pairs(f, R_MAX)[0]) for f in frames)
    device_count = sum(len(p[0]) for p in device_pairs(frames, positions, offsets, R_MAX))
    assert device_count == host_pairs, (device_count, host_pairs)
    row = {
        "batch": name,
        "pairs": host_pairs,
        "host_ms": median_ms(lambda: [frame_pairs(f, R_MAX) for f in frames], repeats, device),
        "vesin_torch_ms": median_ms(
            lambda: device_pairs(frames, positions, offsets, R_MAX), repeats, device
        ),
    }
    call = nvalchemi(frames, positions)
    if call is not None:
        start = time.perf_counter()
        pairs = call()[0].shape[-1]
        row["nvalchemi_first_call_s"] = time.perf_counter() - start
        assert pairs == host_pairs, (pairs, host_pairs)
        row["nvalchemi_ms"] = median_ms(call, repeats, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"device": args.device, "rows": []}
    for name, systems in batches().items():
        row = measure(name, systems, args.repeats, device)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
