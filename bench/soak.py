"""Soak: a real ``crossfield serve`` under mixed, faulty and hostile load for a bounded time.

On loopback, against a subprocess server serving a small float64 checkpoint:

- good clients (threads, half unary ``Client.compute``, half ``Client.compute_many``
  streams) send rattled molecules and crystals with mixed heads; every answer is compared
  with an in-process evaluation of the same structure (energy to 1e-8 relative), and every
  streamed structure must come back exactly once;
- victims open streams to the model ``victim`` and die mid-stream: the stream is cancelled,
  its channel closed, or the client process SIGKILLed;
- hostile clients send hypothesis-generated bad requests (see ``hostile_classes``) and
  check each gets its status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED);
- attackers hold the server open: silent streams, floods of HEADERS-only HTTP/2 streams
  on one connection (beyond the server's per-connection cap) and streams that send
  structures and do not read the answers; each must be ended (idle, unread) or refused
  by the server while everyone else is served;
- at ``restart_at`` of the run the server gets SIGTERM and a new one starts on the same
  port; the good clients retry and resubmit what was not answered.

The two servers serve the same weights under versions 1 and 2, so each answer says which
server gave it; hostile clients pause around the restart, so both servers' counters can be
compared with the clients' counts. RSS of each server is sampled from /proc after warm-up.

Usage: python bench/soak.py [--clients 64] [--duration 60] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from crossfield.client import Client, RetryPolicy
from crossfield.v1 import inference_pb2, inference_pb2_grpc
from crossfield.v1.arrays import to_array
from crossfield.v1.messages import compute_request

ELEMENTS = [1, 6, 7, 8, 14]
HEADS = ("pbe", "r2scan", "wb97")
MAX_ATOMS = 256  # --max-atoms-per-structure of the soak server
MAX_MESSAGE = 1 << 20  # --max-message-bytes of the soak server
RTOL = 1e-8
IDLE_TIMEOUT = 2.0  # --stream-idle-timeout of the soak server: attacks end in seconds
# Enough attempts to outlast a restart: drain, start of a new process (tens of seconds on
# two busy cores) and gRPC's own reconnect backoff.
RETRIES = RetryPolicy(attempts=400, initial_backoff=0.05, max_backoff=0.5)
CODES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class SoakConfig:
    clients: int = 64  # good client threads (half unary, half streams)
    duration: float = 60.0  # seconds of load
    victims: int = 4  # threads that start and kill streams (one of them kills processes)
    hostile: int = 4  # threads that send bad requests
    attackers: int = 2  # threads that open idle, HEADERS-only and unread streams
    examples_per_class: int = 20  # hypothesis examples per class of bad request
    restart_at: float | None = 0.4  # fraction of the run; None: no restart
    warmup: float = 5.0  # seconds before RSS sampling counts
    seed: int = 0


# -- model, structures, references -------------------------------------------------------
def small_model():
    """Small three-head model (different E0s and scales: a wrong head shows), float64."""
    import torch

    from crossfield.model import HeadConfig, ModelConfig, build_model

    n = len(ELEMENTS)
    heads = [
        HeadConfig("pbe", e0s=[-13.6 - i for i in range(n)], scale=0.8),
        HeadConfig("r2scan", e0s=[-13.0 - 2 * i for i in range(n)], shift=0.1),
        HeadConfig("wb97", e0s=[-12.0 + i for i in range(n)], scale=1.3),
    ]
    config = ModelConfig(
        elements=ELEMENTS,
        heads=heads,
        r_max=4.0,
        hidden_irreps="8x0e+8x1o",
        max_ell=2,
        correlation=2,
        radial_mlp=[16, 16],
        avg_num_neighbors=8.0,
    )
    return build_model(config, seed=0).to(torch.float64).eval()


def structure_pool(count: int, seed: int) -> list:
    """Rattled molecules and crystals (ASE Atoms), no two alike."""
    from ase.build import bulk, molecule

    rng = np.random.default_rng(seed)
    templates = [
        molecule("H2O"),
        molecule("CH4"),
        molecule("C6H6"),
        molecule("CH3CH2OH"),
        molecule("NH3"),
        bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("C", "diamond", a=3.57),
        bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1)),
    ]
    pool = []
    for index in range(count):
        atoms = templates[index % len(templates)].copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        if atoms.pbc.any():
            atoms.cell = atoms.cell.array @ (np.eye(3) + rng.normal(scale=0.01, size=(3, 3)))
        pool.append(atoms)
    return pool


def reference_energies(model, pool: list) -> dict[tuple[int, str], float]:
    """In-process energy of every (structure, head), the numbers answers must match."""
    from crossfield.model import Structure, evaluate

    structures = [Structure.from_atoms(a, head=h) for a in pool for h in HEADS]
    results = evaluate(model, structures, compute_stress=False)
    keys = [(i, h) for i in range(len(pool)) for h in HEADS]
    return {key: float(r["energy"]) for key, r in zip(keys, results)}


def write_checkpoints(model, folder: Path) -> tuple[Path, Path]:
    """The same weights as versions 1 and 2: answers then say which server gave them."""
    from crossfield.model import save_checkpoint

    paths = (folder / "v1.pt", folder / "v2.pt")
    for version, path in enumerate(paths, start=1):
        save_checkpoint(model, path, metadata={"version": str(version), "purpose": "soak"})
    return paths


# -- the server process ------------------------------------------------------------------
@dataclass
class ServerProcess:
    """One ``crossfield serve`` subprocess, its ports, output and RSS samples."""

    process: subprocess.Popen
    port: int = 0
    metrics_port: int = 0
    output: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (time, kB)
    ready_at: float = 0.0

    @classmethod
    def start(
        cls, checkpoint: Path, port: int = 0, grace: float = 2.0, extra: Sequence[str] = ()
    ) -> ServerProcess:
        """Serve ``checkpoint`` as ``small`` and ``victim``; ``extra`` flags come last and
        so override the soak's own."""
        command = [sys.executable, "-m", "crossfield.cli", "serve"]
        command += ["--checkpoint", str(checkpoint), "--name", "small"]
        command += ["--checkpoint", str(checkpoint), "--name", "victim"]
        command += ["--dtype", "float64", "--device", "cpu", "--threads", "1"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
        command += ["--max-atoms-per-structure", str(MAX_ATOMS)]
        command += ["--stream-idle-timeout", str(IDLE_TIMEOUT)]
        command += ["--max-message-bytes", str(MAX_MESSAGE)]
        command += ["--max-delay-ms", "2", "--grace", str(grace), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        server = cls(process)
        deadline = time.monotonic() + 120
        for line in process.stdout:
            server.output.append(line)
            match = re.search(r"listening on port (\d+), metrics on port (\d+)", line)
            if match:
                server.port, server.metrics_port = int(match.group(1)), int(match.group(2))
                break
            if time.monotonic() > deadline:
                break
        if not server.port:
            process.kill()
            raise RuntimeError("server did not start:\n" + "".join(server.output[-30:]))
        server.ready_at = time.monotonic()
        threading.Thread(target=lambda: server.output.extend(process.stdout), daemon=True).start()
        return server

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def sample_rss(self) -> None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        if match and self.alive:
            self.rss.append((time.monotonic(), int(match.group(1))))

    def scrape(self) -> Counter:
        """crossfield_requests_total by (model, status), and streams ended by
        ("stream-end", reason)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        counts: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "crossfield_requests_total":
                    counts[(sample.labels["model"], sample.labels["status"])] += int(sample.value)
                elif sample.name == "crossfield_streams_ended_total":
                    counts[("stream-end", sample.labels["reason"])] += int(sample.value)
        return counts

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.alive:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)

    def rss_growth(self, warmup: float) -> tuple[int, int, int]:
        """(baseline kB, growth kB, samples): median of the first and last fifth of the
        samples taken after ``warmup`` seconds of load."""
        samples = [kb for t, kb in self.rss if t >= self.ready_at + warmup]
        if len(samples) < 5:
            return 0, 0, len(samples)
        fifth = max(1, len(samples) // 5)
        first, last = np.median(samples[:fifth]), np.median(samples[-fifth:])
        return int(first), int(last - first), len(samples)


# -- bookkeeping -------------------------------------------------------------------------
class Tally:
    """Client-side counts and failed checks, shared by all client threads."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def add(self, key: tuple, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def fail(self, message: str) -> None:
        with self._lock:
            if len(self.failures) < 200:
                self.failures.append(message)


@dataclass
class Run:
    """What every client thread shares: the target, the clock, the tallies."""

    address: str
    deadline: float
    pool: list
    references: dict[tuple[int, str], float]
    tally: Tally
    rng_seed: int
    warmup: float
    hostile_gate: threading.Event  # set: hostile clients may send (cleared around restart)
    hostile_in_flight: int = 0
    hostile_cond: threading.Condition = field(default_factory=threading.Condition)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def wait_hostile_idle(self, timeout: float = 60.0) -> None:
        with self.hostile_cond:
            self.hostile_cond.wait_for(lambda: self.hostile_in_flight == 0, timeout)


def check_energy(run: Run, key: tuple[int, str], energy: float | None, where: str) -> bool:
    expected = run.references[key]
    if energy is None or not math.isclose(energy, expected, rel_tol=RTOL, abs_tol=0.0):
        run.tally.fail(f"{where}: structure {key} energy {energy} != reference {expected}")
        return False
    return True


# -- good clients ------------------------------------------------------------------------
def good_unary(run: Run, index: int) -> None:
    rng = random.Random(run.rng_seed * 1000 + index)
    with Client(run.address, model="small", retries=RETRIES, timeout=60.0) as client:
        while run.running():
            structure, head = rng.randrange(len(run.pool)), rng.choice(HEADS)
            try:
                result = client.compute(run.pool[structure], ("energy",), head=head)
            except Exception as err:  # any failure of a good request is a finding
                run.tally.fail(f"unary {structure}/{head}: {type(err).__name__}: {err}")
                run.tally.add(("good", getattr(err, "code", "CLIENT")))
                continue
            ok = check_energy(run, (structure, head), result.energy, "unary")
            run.tally.add(("good", "OK" if ok else "WRONG"))
            run.tally.add(("good-version", result.version))


def good_stream(run: Run, index: int, chunk: int = 24) -> None:
    """Runs of ``compute_many`` (one head each) until the deadline; every structure
    of a run must come back exactly once, with the right energy."""
    rng = random.Random(run.rng_seed * 1000 + 500 + index)
    with Client(run.address, model="small", retries=RETRIES) as client:
        while run.running():
            head = rng.choice(HEADS)
            picks = [rng.randrange(len(run.pool)) for _ in range(chunk)]
            seen: Counter = Counter()
            try:
                results = client.compute_many(
                    (run.pool[p] for p in picks),
                    ("energy",),
                    head=head,
                    ordered=False,
                    max_in_flight=8,
                )
                for result in results:
                    seen[result.index] += 1
                    if result.error is not None:
                        run.tally.fail(f"stream item {picks[result.index]}/{head}: {result.error}")
                        run.tally.add(("good", result.error.code))
                        continue
                    key = (picks[result.index], head)
                    ok = check_energy(run, key, result.energy, "stream")
                    run.tally.add(("good", "OK" if ok else "WRONG"))
                    run.tally.add(("good-version", result.version))
            except Exception as err:
                run.tally.fail(f"stream run: {type(err).__name__}: {err}")
                run.tally.add(("good", "RUN-FAILED"))
            missing = [i for i in range(chunk) if seen[i] == 0]
            twice = [i for i in range(chunk) if seen[i] > 1]
            if missing or twice:
                run.tally.fail(f"stream run: missing {missing}, answered twice {twice}")
                run.tally.add(("good", "LOST"), len(missing))
                run.tally.add(("good", "DUPLICATE"), len(twice))


# -- victims: clients that die mid-stream ------------------------------------------------
def victim_requests(run: Run, rng: random.Random, count: int) -> Iterator:
    for n in range(count):
        atoms = run.pool[rng.randrange(len(run.pool))]
        periodic = bool(atoms.pbc.any())
        yield compute_request(
            atoms.numbers,
            atoms.positions,
            atoms.cell.array if periodic else None,
            atoms.pbc if periodic else None,
            model="victim",
            head=rng.choice(HEADS),
            properties=("energy", "forces"),
            id=str(n),
        )


def victim(run: Run, index: int) -> None:
    """Cancel streams, close channels under them, or SIGKILL a client process (thread 0)."""
    rng = random.Random(run.rng_seed * 1000 + 900 + index)
    kinds = ("cancel", "close", "kill") if index == 0 else ("cancel", "close")
    while run.running():
        kind = rng.choice(kinds)
        try:
            if kind == "kill":
                kill_client_process(run, rng)
            else:
                abandon_stream(run, rng, close_channel=kind == "close")
            run.tally.add(("victim", kind))
        except Exception as err:
            run.tally.fail(f"victim {kind}: {type(err).__name__}: {err}")
        time.sleep(rng.uniform(0.05, 0.3))


def abandon_stream(run: Run, rng: random.Random, close_channel: bool) -> None:
    channel = grpc.insecure_channel(run.address)
    call = inference_pb2_grpc.InferenceStub(channel).ComputeStream(
        victim_requests(run, rng, 200), timeout=30
    )
    wanted, received = rng.randrange(0, 20), 0
    try:
        for _ in call:
            received += 1
            if received >= wanted:
                break
    except grpc.RpcError:
        pass  # e.g. UNAVAILABLE during the restart; the point is to go away
    finally:
        run.tally.add(("victim", "received"), received)
        if close_channel:
            channel.close()
        else:
            call.cancel()
            channel.close()


KILLED_CLIENT = """
import sys, time, grpc, numpy as np
from crossfield.v1 import inference_pb2_grpc
from crossfield.v1.messages import compute_request
def requests():
    for n in range(10**6):
        yield compute_request(np.array([8, 1, 1]), np.array([[0, 0, 0], [0.96, 0, 0],
            [-0.24, 0.93, 0.0]]) + 0.01 * (n % 7), model="victim", id=str(n))
stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(sys.argv[1]))
# wait_for_ready: a victim started during the deliberate restart waits for the new server;
# one that reached the old server as it stopped is told UNAVAILABLE (or CANCELLED, before
# a handler took it: grpc/grpc#41785) and tries again
again = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
deadline = time.monotonic() + 60
while True:
    try:
        for n, _ in enumerate(stub.ComputeStream(requests(), timeout=60, wait_for_ready=True)):
            if n == 0:
                print("streaming", flush=True)
        break
    except grpc.RpcError as err:
        if err.code() not in again or time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""


def kill_client_process(run: Run, rng: random.Random) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, run.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        start = time.monotonic()
        line = process.stdout.readline()  # blocks until the first answer (or exit)
        if line.strip() == "streaming":
            time.sleep(rng.uniform(0.0, 0.5))
        elif time.monotonic() - start < 1:
            run.tally.fail("killed client exited before streaming")
    finally:
        process.kill()
        process.wait(timeout=30)


# -- hostile clients ---------------------------------------------------------------------
@dataclass
class Hostile:
    name: str
    request: inference_pb2.ComputeRequest | None  # None: built lazily (oversize)
    expected: frozenset[str]
    counted: bool = True  # does the server's request counter see it (not: gRPC-layer refusals)


def hostile(run: Run, index: int, corpus: list[Hostile]) -> None:
    rng = random.Random(run.rng_seed * 1000 + 700 + index)
    stub = inference_pb2_grpc.InferenceStub(
        grpc.insecure_channel(run.address, options=[("grpc.max_send_message_length", -1)])
    )
    streaming = index % 2 == 1
    while run.running():
        with run.hostile_cond:
            if not run.hostile_gate.is_set():
                run.hostile_cond.wait(0.2)
                continue
            run.hostile_in_flight += 1
        try:
            if streaming:
                batch = [h for h in rng.sample(corpus, min(8, len(corpus))) if h.counted]
                hostile_stream(run, stub, batch)
            else:
                hostile_unary(run, stub, rng.choice(corpus))
        finally:
            with run.hostile_cond:
                run.hostile_in_flight -= 1
                run.hostile_cond.notify_all()
        time.sleep(rng.uniform(0.0, 0.05))


def hostile_unary(run: Run, stub, case: Hostile) -> None:
    try:
        stub.Compute(case.request, timeout=30)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    record_hostile(run, case, code)


def hostile_stream(run: Run, stub, batch: list[Hostile]) -> None:
    requests = []
    for n, case in enumerate(batch):
        request = inference_pb2.ComputeRequest()
        request.CopyFrom(case.request)
        request.id = str(n)
        requests.append(request)
    seen: Counter = Counter()
    try:
        for response in stub.ComputeStream(iter(requests), timeout=30):
            n = int(response.id)
            seen[n] += 1
            record_hostile(run, batch[n], CODES.get(response.status.code, "?"))
    except grpc.RpcError as err:
        run.tally.fail(f"hostile stream failed as a whole: {err.code().name}: {err.details()}")
    for n in range(len(batch)):
        if seen[n] != 1:
            run.tally.fail(f"hostile stream item {batch[n].name} answered {seen[n]} times")


def record_hostile(run: Run, case: Hostile, code: str) -> None:
    group = "hostile" if case.counted else "hostile-grpc"
    run.tally.add((group, code))
    run.tally.add(("class", case.name, code))
    if code not in case.expected:
        run.tally.fail(f"hostile {case.name}: got {code}, expected {sorted(case.expected)}")


# -- attackers: streams that hold the server open ----------------------------------------
def attacker(run: Run, index: int) -> None:
    """Idle streams, a HEADERS-only flood and an unread stream in turn; paused (like the
    hostile clients) around the restart, so that the counters can be compared."""
    attacks = (idle_streams, headers_flood, unread_stream)
    turn = index
    while run.running():
        with run.hostile_cond:
            if not run.hostile_gate.is_set():
                run.hostile_cond.wait(0.2)
                continue
            run.hostile_in_flight += 1
        attack = attacks[turn % len(attacks)]
        turn += 1
        try:
            attack(run)
        except Exception as err:
            run.tally.fail(f"attack {attack.__name__}: {type(err).__name__}: {err}")
        finally:
            with run.hostile_cond:
                run.hostile_in_flight -= 1
                run.hostile_cond.notify_all()


def ended_status(call) -> tuple[str, str]:
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


def idle_streams(run: Run, count: int = 8) -> None:
    """Streams that send nothing: the server must end each UNAVAILABLE ("stream idle")."""
    channel = grpc.insecure_channel(run.address)
    stub = inference_pb2_grpc.InferenceStub(channel)
    silent = [queue.Queue() for _ in range(count)]
    calls = [stub.ComputeStream(iter(q.get, None), timeout=8 * IDLE_TIMEOUT) for q in silent]
    for call, requests in zip(calls, silent):
        code, details = ended_status(call)
        requests.put(None)
        if code == "UNAVAILABLE" and "stream idle" in details:
            run.tally.add(("attack", "idle stream ended"))
        else:
            run.tally.fail(f"idle stream: {code} {details!r}, expected UNAVAILABLE (idle)")
    channel.close()


def headers_flood(run: Run, streams: int = 300) -> None:
    """HEADERS-only streams on one connection, ignoring its stream limit: the excess is
    refused at once, the rest held until the idle timeout ends them."""
    import h2.config
    import h2.connection
    import h2.events
    from h2.settings import SettingCodes

    host, _, port = run.address.rpartition(":")
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/crossfield.v1.Inference/ComputeStream"),
        (":authority", host),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    for _ in range(streams):
        connection.send_headers(connection.get_next_available_stream_id(), headers)
    refused: set[int] = set()  # reset before any answer: beyond the connection's limit
    ended: set[int] = set()  # answered (a status) by the server: the idle timeout
    with socket.create_connection((host, int(port)), timeout=0.2) as sock:
        sock.sendall(connection.data_to_send())
        deadline = time.monotonic() + 4 * IDLE_TIMEOUT
        while len(refused | ended) < streams and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id not in ended:
                    refused.add(event.stream_id)
            sock.sendall(connection.data_to_send())
    run.tally.add(("attack", "flood stream refused"), len(refused))
    run.tally.add(("attack", "flood stream ended"), len(ended))
    if not refused or len(refused | ended) != streams:
        run.tally.fail(
            f"headers flood: {len(refused)} refused + {len(ended)} ended of {streams} streams"
        )


def unread_stream(run: Run, count: int = 60) -> None:
    """A stream that sends structures and reads nothing for a while. Once its answers fill
    the client's 64 KiB HTTP/2 window (a dozen 128-atom answers) the server's writes
    stall, and after the idle timeout it must end the stream UNAVAILABLE ("stream not
    read"); a server too busy to get that far in time answers all of them instead. Either
    way no answer may be lost or doubled."""
    atoms = max(run.pool, key=len).repeat((2, 2, 2))  # a 16-atom crystal: 128 atoms
    request = compute_request(
        atoms.numbers,
        atoms.positions,
        atoms.cell.array if atoms.pbc.any() else None,
        atoms.pbc if atoms.pbc.any() else None,
        model="victim",
        properties=("energy", "forces", "atom_energies"),
    )

    def requests() -> Iterator:
        for n in range(count):
            copy = inference_pb2.ComputeRequest()
            copy.CopyFrom(request)
            copy.id = str(n)
            yield copy

    # without BDP probing the client's receive window stays small: writes stall soon
    channel = grpc.insecure_channel(run.address, options=[("grpc.http2.bdp_probe", 0)])
    call = inference_pb2_grpc.InferenceStub(channel).ComputeStream(requests(), timeout=60)
    time.sleep(3 * IDLE_TIMEOUT)
    seen: Counter = Counter()
    code, details = "OK", ""
    try:
        for response in call:
            seen[response.id] += 1
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
    channel.close()
    if any(n > 1 for n in seen.values()):
        run.tally.fail(f"unread stream: answers doubled: {[i for i, n in seen.items() if n > 1]}")
    if code == "UNAVAILABLE" and "stream not read" in details:
        run.tally.add(("attack", "unread stream ended"))
    elif code == "OK" and len(seen) == count:
        run.tally.add(("attack", "unread stream answered before the timeout"))
    else:
        run.tally.fail(f"unread stream: {code} {details!r} after {len(seen)} of {count} answers")


# -- the run -----------------------------------------------------------------------------
@dataclass
class SoakReport:
    counts: Counter
    failures: list[str]
    servers: list[dict]  # per server: counters, RSS, exit code
    duration: float
    restarted: bool

    @property
    def ok(self) -> bool:
        return not self.failures


def run_soak(config: SoakConfig, log: Callable[[str], None] = print) -> SoakReport:
    import torch

    torch.set_num_threads(1)
    model = small_model()
    pool = structure_pool(24, config.seed)
    references = reference_energies(model, pool)
    corpus = hostile_corpus(config.examples_per_class, config.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="crossfield-soak-") as folder:
        v1, v2 = write_checkpoints(model, Path(folder))
        server = ServerProcess.start(v1)
        servers = [server]
        log(
            f"soak: server pid {server.process.pid} on port {server.port}; "
            f"{config.clients} clients for {config.duration:.0f} s"
        )
        gate = threading.Event()
        gate.set()
        start = time.monotonic()
        run = Run(
            f"127.0.0.1:{server.port}",
            start + config.duration,
            pool,
            references,
            tally,
            config.seed,
            config.warmup,
            gate,
        )
        threads = [
            threading.Thread(target=good_unary if i % 2 == 0 else good_stream, args=(run, i))
            for i in range(config.clients)
        ]
        threads += [threading.Thread(target=victim, args=(run, i)) for i in range(config.victims)]
        threads += [
            threading.Thread(target=hostile, args=(run, i, corpus)) for i in range(config.hostile)
        ]
        threads += [
            threading.Thread(target=attacker, args=(run, i)) for i in range(config.attackers)
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.5):
                servers[-1].sample_rss()
                if not servers[-1].alive and not restarting.is_set():
                    tally.fail(f"server pid {servers[-1].process.pid} died unexpectedly")
                    return

        restarting = threading.Event()
        threading.Thread(target=sample, daemon=True).start()
        summaries = []
        if config.restart_at is not None:
            time.sleep(config.duration * config.restart_at)
            remaining = config.duration * (1 - config.restart_at)
            restart_began = time.monotonic()
            run.deadline = math.inf  # nobody stops while the server restarts
            summaries.append(restart(server, v2, run, restarting, log))
            server = ServerProcess.start(v2, port=server.port)
            servers.append(server)
            restarting.clear()
            gate.set()
            # The load after the restart lasts as planned, however long the restart took.
            run.deadline = time.monotonic() + remaining
            log(
                f"soak: new server pid {server.process.pid} serving on port {server.port} "
                f"{time.monotonic() - restart_began:.1f} s after SIGTERM"
            )
        for thread in threads:
            thread.join(timeout=max(1.0, run.deadline - time.monotonic()) + 120)
            if thread.is_alive():
                tally.fail(f"client thread {thread.name} did not finish")
        stop_sampling.set()
        if not server.alive:
            tally.fail("the final server died")
        final = server.scrape() if server.alive else Counter()
        code = server.stop()
        summaries.append(summary(server, final, code, config.warmup))
    report = SoakReport(
        tally.counts,
        tally.failures,
        summaries,
        time.monotonic() - start,
        config.restart_at is not None,
    )
    compare_counters(report)
    return report


def restart(server: ServerProcess, v2: Path, run: Run, restarting, log) -> dict:
    """Pause hostile traffic, snapshot the counters, SIGTERM, wait for the exit."""
    run.hostile_gate.clear()
    run.wait_hostile_idle()
    counters = server.scrape()
    restarting.set()
    log(f"soak: SIGTERM to server pid {server.process.pid} under load")
    code = server.stop(signal.SIGTERM)
    if code != 0:
        run.tally.fail(f"server exited with {code} after SIGTERM")
    return summary(server, counters, code, run.warmup)


def summary(server: ServerProcess, counters: Counter, code: int, warmup: float) -> dict:
    baseline, growth, samples = server.rss_growth(warmup)
    return {
        "pid": server.process.pid,
        "counters": counters,
        "exit": code,
        "rss_kb": baseline,
        "rss_growth_kb": growth,
        "rss_samples": samples,
    }


# -- hypothesis-generated bad requests ---------------------------------------------------
WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
INVALID = frozenset({"INVALID_ARGUMENT"})


def _request(numbers, positions, cell=None, pbc=None, **fields) -> inference_pb2.ComputeRequest:
    request = compute_request(
        np.array([8, 1, 1]), WATER, None, None, model=fields.pop("model", "small"), **fields
    )
    structure = request.structure
    for name, value in (("numbers", numbers), ("positions", positions), ("cell", cell)):
        if isinstance(value, inference_pb2.Array):
            getattr(structure, name).CopyFrom(value)
        elif value is not None:
            getattr(structure, name).CopyFrom(to_array(value))
    if pbc is not None:
        structure.pbc[:] = list(pbc)
    return request


def hostile_strategies() -> dict[str, tuple]:
    """Class name -> (strategy of requests, expected statuses, counted by the server)."""
    from hypothesis import strategies as st

    floats = st.floats(allow_nan=False, allow_infinity=False, min_value=-50, max_value=50)
    element = st.sampled_from(ELEMENTS)

    @st.composite
    def too_many_atoms(draw):
        n = draw(st.integers(MAX_ATOMS + 1, 4 * MAX_ATOMS))
        if draw(st.booleans()):  # real arrays
            positions = np.random.default_rng(n).uniform(0, 30, (n, 3))
            return _request(np.full(n, 1, np.int32), positions)
        claimed = draw(st.integers(MAX_ATOMS + 1, 2**40))  # a count the bytes do not back
        return _request(
            inference_pb2.Array(dtype=inference_pb2.DTYPE_INT64, shape=[claimed], data=b"\1" * 8),
            WATER,
        )

    @st.composite
    def non_finite(draw):
        positions = WATER.copy()
        row, column = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        positions[row, column] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if draw(st.booleans()):  # or in the cell of a crystal
            cell = np.eye(3) * 6.0
            cell[row, column] = positions[row, column]
            return _request([8, 1, 1], WATER, cell, (True, True, True))
        return _request([8, 1, 1], positions)

    @st.composite
    def bad_numbers(draw):
        bad = draw(
            st.one_of(
                st.integers(-(2**63), 0),
                st.integers(119, 2**63 - 1),
                st.integers(1, 118).filter(lambda z: z not in ELEMENTS),
            )
        )
        numbers = np.array([8, 1, 1], dtype=np.int64)
        numbers[draw(st.integers(0, 2))] = bad
        return _request(numbers, WATER)

    @st.composite
    def mismatched(draw):
        n = draw(st.integers(1, 12))
        m = draw(st.integers(0, 12).filter(lambda k: k != n))
        return _request(np.full(n, 1), np.zeros((m, 3)) + np.arange(m)[:, None])

    @st.composite
    def wrong_array(draw):
        kind = draw(st.sampled_from(["dtype", "float numbers", "int positions", "shape", "bytes"]))
        if kind == "dtype":
            dtype = draw(st.sampled_from([0, 5, 17, -1]))
            array = inference_pb2.Array(dtype=dtype, shape=[3], data=b"\0" * 24)
            return _request(array, WATER)
        if kind == "float numbers":
            return _request(np.array([8.0, 1.0, 1.0]), WATER)
        if kind == "int positions":
            return _request([8, 1, 1], WATER.astype(np.int64))
        if kind == "shape":
            shape = draw(st.sampled_from([[3], [9], [3, 3, 1], [1, 3, 3], [3, 2], []]))
            return _request([8, 1, 1], WATER.reshape(-1)[: math.prod(shape)].reshape(shape))
        data = draw(st.binary(max_size=64).filter(lambda b: len(b) != 72))
        array = inference_pb2.Array(dtype=inference_pb2.DTYPE_FLOAT64, shape=[3, 3], data=data)
        return _request([8, 1, 1], array)

    @st.composite
    def empty(draw):
        if draw(st.booleans()):
            return _request(np.zeros(0, np.int32), np.zeros((0, 3)))
        request = _request([8, 1, 1], WATER)
        request.ClearField("structure")
        return request

    @st.composite
    def enormous_cell(draw):
        length = draw(st.floats(1001.0, 1e300))
        cell = np.diag([draw(st.floats(3.0, 20.0)) for _ in range(3)])
        cell[draw(st.integers(0, 2))] *= length / 3.0
        pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
        return _request([8, 1, 1], WATER, cell, pbc)

    @st.composite
    def singular_cell(draw):
        a = np.array([draw(floats) for _ in range(3)]) + np.array([5.0, 0, 0])
        cell = np.stack([a, a * draw(st.sampled_from([1.0, -2.0, 0.0])), [0, 0, 7.0]])
        if draw(st.booleans()):
            cell = np.zeros((3, 3))
        return _request([8, 1, 1], WATER, cell, (True, True, True))

    @st.composite
    def thin_cell(draw):  # periodic layers closer than the cutoff / 100
        cell = np.diag([10.0, 10.0, draw(st.floats(1e-9, 0.039))])
        return _request([8, 1, 1], WATER, cell, (True, True, True))

    @st.composite
    def far_coordinates(draw):  # once SIGFPE in the neighbour list; now beyond --max-coordinate
        if draw(st.booleans()):  # big-endian bytes labelled FLOAT64 decode to ~1e19
            swapped = WATER.astype(">f8").tobytes()
            array = inference_pb2.Array(
                dtype=inference_pb2.DTYPE_FLOAT64, shape=[3, 3], data=swapped
            )
            return _request([8, 1, 1], array)
        positions = WATER.copy()
        axis = draw(st.integers(0, 2))
        positions[draw(st.integers(0, 2)), axis] = draw(st.sampled_from([-1, 1])) * draw(
            st.floats(1.01e8, 1e300)
        )
        if draw(st.booleans()):  # a slab open along z
            return _request([8, 1, 1], positions, np.diag([20.0, 20.0, 0.0]), (True, True, False))
        return _request([8, 1, 1], positions)

    @st.composite
    def duplicated_atoms(draw):
        n = draw(st.integers(2, 6))
        positions = np.array([[draw(floats) for _ in range(3)] for _ in range(n)]) * 0.1
        positions[1] = positions[0]
        numbers = [draw(element) for _ in range(n)]
        return _request(numbers, positions)

    @st.composite
    def unknown_name(draw):
        text = st.text(min_size=1, max_size=20)
        kind = draw(st.sampled_from(["model", "head", "version"]))
        value = draw(text.filter(lambda t: t not in ("small", "victim", *HEADS, "1", "2")))
        return _request([8, 1, 1], WATER, **{kind: value})

    @st.composite
    def oversize(draw):
        n = draw(st.integers(MAX_MESSAGE // 24 + 1, MAX_MESSAGE // 12))
        return _request(np.full(n, 1, np.int32), np.zeros((n, 3)))

    return {
        "too many atoms": (too_many_atoms(), INVALID, True),
        "NaN/inf": (non_finite(), INVALID, True),
        "bad atomic numbers": (bad_numbers(), INVALID, True),
        "mismatched lengths": (mismatched(), INVALID, True),
        "wrong dtype/shape": (wrong_array(), INVALID, True),
        "empty": (empty(), INVALID, True),
        "enormous cell": (enormous_cell(), INVALID, True),
        "singular cell": (singular_cell(), INVALID, True),
        "thin cell": (thin_cell(), INVALID, True),
        "duplicated atoms": (duplicated_atoms(), INVALID, True),
        "far coordinates": (far_coordinates(), INVALID, True),
        "unknown model/head/version": (unknown_name(), frozenset({"NOT_FOUND"}), True),
        "oversize message": (oversize(), frozenset({"RESOURCE_EXHAUSTED"}), False),
    }


def draw_examples(strategy, count: int, seed: int) -> list:
    """``count`` examples of ``strategy``, drawn by hypothesis's engine (shrinking off)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    found: list = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value) -> None:
        found.append(value)

    collect()
    return found[:count]


def hostile_corpus(count: int, seed: int) -> list[Hostile]:
    corpus = []
    for name, (strategy, expected, counted) in hostile_strategies().items():
        for request in draw_examples(strategy, count, seed):
            corpus.append(Hostile(name, request, expected, counted))
    return corpus


# -- counters and the table --------------------------------------------------------------
def compare_counters(report: SoakReport) -> None:
    """The final server's counters must equal what the clients saw from it; the first
    server's (scraped with hostile traffic paused) must cover the hostile answers it gave.
    Victims: the servers may count no more structures than the victims sent."""
    counts = report.counts
    servers = report.servers
    final = servers[-1]["counters"]
    version = "2" if report.restarted else "1"
    good_final = counts[("good-version", version)]
    server_good_ok = final[("small", "OK")]
    if server_good_ok != good_final:
        report.failures.append(
            f"final server counted {server_good_ok} OK for model small, clients got "
            f"{good_final} answers from it"
        )
    for status in ("INVALID_ARGUMENT", "NOT_FOUND"):
        server_total = sum(s["counters"][(m, status)] for s in servers for m in ("small", "-"))
        if server_total != counts[("hostile", status)]:
            report.failures.append(
                f"{status}: servers counted {server_total}, clients got "
                f"{counts[('hostile', status)]}"
            )


def table(report: SoakReport) -> str:
    counts = report.counts
    lines = [f"{'what':44s} {'clients':>9s} {'server':>9s}"]

    def row(what: str, clients, server="") -> None:
        lines.append(f"{what:44s} {clients!s:>9s} {server!s:>9s}")

    servers = report.servers
    for index, s in enumerate(servers):
        tag = (
            ("first server (pre-SIGTERM scrape)", "restarted server")[index]
            if len(servers) > 1
            else "server"
        )
        row(f"-- {tag}, pid {s['pid']}, exit {s['exit']}", "", "")
        version = str(index + 1)
        row(
            "  good answers OK (model small)",
            counts[("good-version", version)],
            s["counters"][("small", "OK")],
        )
        for status in ("INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "UNAVAILABLE"):
            server = sum(s["counters"][(m, status)] for m in ("small", "-"))
            row(f"  small/- {status}", "", server)
        ends = {k[1]: v for k, v in s["counters"].items() if k[0] == "stream-end"}
        row("  streams ended (server)", "", " ".join(f"{k}={v}" for k, v in sorted(ends.items())))
        victim = {k[1]: v for k, v in s["counters"].items() if k[0] == "victim"}
        row("  victim statuses (server)", "", " ".join(f"{k}={v}" for k, v in victim.items()))
        row(f"  RSS baseline MiB ({s['rss_samples']} samples)", "", f"{s['rss_kb'] / 1024:.1f}")
        row("  RSS growth after warm-up MiB", "", f"{s['rss_growth_kb'] / 1024:+.1f}")
    row("-- clients", "", "")
    for key in sorted(k for k in counts if k[0] == "good"):
        row(f"  good {key[1]}", counts[key])
    for key in sorted(k for k in counts if k[0] in ("hostile", "hostile-grpc")):
        row(f"  {key[0]} {key[1]}", counts[key])
    for key in sorted(k for k in counts if k[0] == "victim"):
        row(f"  victim {key[1]}", counts[key])
    for key in sorted(k for k in counts if k[0] == "attack"):
        row(f"  attack: {key[1]}", counts[key])
    row("-- hostile classes (status: count)", "", "")
    classes: dict[str, list[str]] = {}
    for key, n in sorted(counts.items()):
        if key[0] == "class":
            classes.setdefault(key[1], []).append(f"{key[2]}:{n}")
    for name, parts in classes.items():
        lines.append(f"  {name:42s} {' '.join(parts)}")
    lines.append(f"failures: {len(report.failures)}")
    lines += [f"  {f}" for f in report.failures[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--examples", type=int, default=20, help="per class of bad request")
    parser.add_argument("--no-restart", action="store_true")
    parser.add_argument("--quick", action="store_true", help="~15 s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SoakConfig(
        clients=args.clients,
        duration=15.0 if args.quick else args.duration,
        examples_per_class=5 if args.quick else args.examples,
        restart_at=None if args.no_restart else 0.4,
        warmup=3.0 if args.quick else 5.0,
        seed=args.seed,
    )
    report = run_soak(config)
    print(table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
