"""``bench/serve_throughput.py`` end to end at a tiny size: a real server, a client process
in both modes (unary calls and MD sessions), the model in the server's process and in a
process of its own, and the JSON the README quotes.

The bench raises when any request fails, so this also checks that every one of the
clients' structures was answered in both modes.
"""

from __future__ import annotations

import json

from bench_support import load_bench


def test_serve_throughput_measures_unary_calls_and_sessions(tmp_path):
    bench = load_bench("serve_throughput")
    out = tmp_path / "throughput.json"
    argv = ["--model", "small", "--clients", "4", "--molecules", "12", "--crystals", "8"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["workloads"]) == {"molecules", "crystals"}
    for kind, modes in result["workloads"].items():
        expected = {"unary", "sessions", "unary, model process", "sessions, model process"}
        assert set(modes) == expected, kind
        for row in modes.values():
            assert row["server_per_s"] > 0 and row["mean_batch"] >= 1
            assert row["vs_batched"] == row["server_per_s"] / row["in_process_batched_per_s"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_session_clients_follow_their_own_trajectories():
    """Client k's structures are one template moved a little each step (what a session
    needs to send positions only), not a new molecule every time."""
    bench = load_bench("serve_throughput")
    structures = bench.workload("molecules", 24, clients=4)
    for trajectory in bench._trajectories(structures, 4):
        numbers = {tuple(s.numbers) for s in trajectory}
        assert len(numbers) == 1
        steps = [abs(b.positions - a.positions).max() for a, b in zip(trajectory, trajectory[1:])]
        assert 0 < max(steps) < 0.2
