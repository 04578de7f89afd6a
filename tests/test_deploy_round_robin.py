"""Several replicas behind client-side round-robin, as deployed behind a Kubernetes
headless Service: two ``crossfield serve`` processes on loopback, clients that spread
their load over both (gRPC's own round_robin policy, and ``crossfield.client.Client``
with a list of addresses), and no failed request when one replica is stopped with
SIGTERM mid-load. Each replica's share is read from its own metrics endpoint, as
Prometheus would scrape it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase.build import molecule
from server_support import request_for, small_model

from crossfield.client import Client, RetryPolicy
from crossfield.model import Structure, evaluate, save_checkpoint
from crossfield.v1 import inference_pb2_grpc

INFERENCE = "crossfield.v1.Inference"
# What a client of the headless Service configures: round_robin over every address the
# name resolves to, only to replicas whose health service says SERVING (a draining replica
# turns NOT_SERVING first), and retries of UNAVAILABLE (a replica that went away) and of
# CANCELLED: gRPC core answers a call that reached a stopping server before a handler took
# it with CANCELLED (grpc/grpc#41785). Compute is idempotent, so retrying it is safe.
RETRY_ON = ("UNAVAILABLE", "CANCELLED")
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": INFERENCE},
    "methodConfig": [
        {
            "name": [{"service": INFERENCE}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(RETRY_ON),
            },
        }
    ],
}


@dataclass
class Replica:
    """One ``crossfield serve`` process and what it printed."""

    process: subprocess.Popen
    port: int = 0
    metrics_port: int = 0
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answered(self) -> int:
        """Structures this replica answered OK, from its Prometheus endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "crossfield_requests_total" and sample.labels["status"] == "OK"
            )
        )


def start_replica(checkpoint: Path) -> Replica:
    command = [
        sys.executable,
        "-m",
        "crossfield.cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--name",
        "small",
        "--dtype",
        "float64",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--max-delay-ms",
        "2",
        "--threads",
        "1",
        "--grace",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    return Replica(process)


def wait_listening(replica: Replica) -> None:
    """Read the start-up lines up to the ports, then keep draining the output in the
    background so that the server never blocks on a full pipe."""
    for line in replica.process.stdout:
        replica.output.append(line)
        match = re.search(r"listening on port (\d+), metrics on port (\d+)", line)
        if match:
            replica.port, replica.metrics_port = int(match.group(1)), int(match.group(2))
            break
    else:
        pytest.fail("server exited before listening:\n" + "".join(replica.output))
    threading.Thread(
        target=lambda: replica.output.extend(replica.process.stdout), daemon=True
    ).start()


@contextmanager
def replicas(checkpoint: Path, count: int) -> Iterator[list[Replica]]:
    """``count`` servers started side by side (they load in parallel)."""
    with ExitStack() as stack:
        started = [start_replica(checkpoint) for _ in range(count)]
        for replica in started:
            stack.callback(_kill, replica.process)
        for replica in started:
            wait_listening(replica)
        yield started


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def round_robin_channel(addresses: list[str]) -> grpc.Channel:
    """gRPC's own client-side round_robin over a static address list; in Kubernetes the
    target is ``dns:///crossfield-headless.<namespace>.svc.cluster.local:50051``."""
    target = "ipv4:" + ",".join(addresses)
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    return grpc.insecure_channel(target, options=options)


@dataclass
class Load:
    """Clients that keep sending until stopped and record every outcome."""

    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, call, expected: float) -> None:
        while not self.stop.is_set():
            try:
                energy = call()
            except Exception as err:  # every failure counts, whatever its type
                with self.lock:
                    self.failed.append(f"{call.__name__}: {err!r}")
                continue
            with self.lock:
                self.answered += 1
                if not np.isclose(energy, expected, rtol=1e-10, atol=0.0):
                    self.wrong.append(f"{energy} != {expected}")


def test_round_robin_spreads_load_and_survives_a_replica_stopping(tmp_path: Path) -> None:
    model = small_model()
    checkpoint = tmp_path / "small.pt"
    save_checkpoint(model, checkpoint, metadata={"version": "3"})
    atoms = molecule("CH3CH2OH")
    ethanol = Structure.from_atoms(atoms, head="r2scan")
    expected = float(evaluate(model, [ethanol])[0]["energy"])
    request = request_for(ethanol, id="ethanol")

    with replicas(checkpoint, 2) as (first, second):
        channel = round_robin_channel([first.address, second.address])
        stub = inference_pb2_grpc.InferenceStub(channel)
        client = Client(
            [first.address, second.address],
            model="small",
            head="r2scan",
            timeout=30,
            retries=RetryPolicy(
                attempts=8, initial_backoff=0.05, max_backoff=0.5, retry_on=RETRY_ON
            ),
        )

        def grpc_call() -> float:
            return stub.Compute(request, timeout=30, wait_for_ready=True).energy

        def client_call() -> float:
            return client.compute(atoms, properties=("energy",)).energy

        # Both clients spread their calls: each replica answers at least a quarter.
        for call in (grpc_call, client_call):
            before = [first.answered(), second.answered()]
            for _ in range(40):
                assert np.isclose(call(), expected, rtol=1e-10, atol=0.0)
            shares = [first.answered() - before[0], second.answered() - before[1]]
            assert sum(shares) == 40, shares
            assert min(shares) >= 10, f"{call.__name__} did not spread its load: {shares}"
            print(f"{call.__name__}: 40 calls answered {shares[0]} + {shares[1]} by the replicas")

        # Concurrent load from both kinds of client while the first replica drains and exits.
        load = Load()
        workers = [
            threading.Thread(target=load.run, args=(call, expected))
            for call in (grpc_call, grpc_call, client_call, client_call)
        ]
        for worker in workers:
            worker.start()
        try:
            time.sleep(1.0)
            answered_before_stop = load.answered
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=30) == 0, "".join(first.output)
            stopped_at = load.answered
            time.sleep(1.5)
        finally:
            load.stop.set()
            for worker in workers:
                worker.join(timeout=60)
        print(
            f"under load: {answered_before_stop} answered before SIGTERM, {stopped_at} by the "
            f"first replica's exit, {load.answered} in all, {len(load.failed)} failed"
        )
        assert not load.failed, f"{len(load.failed)} failed calls, e.g. {load.failed[:3]}"
        assert not load.wrong, load.wrong[:3]
        assert answered_before_stop > 0 and load.answered - stopped_at > 0, (
            answered_before_stop,
            stopped_at,
            load.answered,
        )

        # Only the second replica is left: everything lands there, nothing fails.
        for call in (grpc_call, client_call):
            before = second.answered()
            for _ in range(10):
                assert np.isclose(call(), expected, rtol=1e-10, atol=0.0)
            assert second.answered() - before == 10
        client.close()
        channel.close()
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=30) == 0
