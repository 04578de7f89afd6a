"""``bench/grpc_floor.py`` runs end to end at a tiny size and reports the three floors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grpc_floor.py"


def test_grpc_floor_reports_the_cost_of_a_step_beyond_the_servers_work():
    command = [sys.executable, str(BENCH), "--steps", "30", "--work-ms", "2"]
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    costs = [float(x) for x in re.findall(r"([\d.]+) ms per step", output.stdout)]
    assert len(costs) == 3, output.stdout
    assert all(0 < cost < 100 for cost in costs), output.stdout  # ms beyond the work
