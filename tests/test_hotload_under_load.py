"""Hot-loading on a real server under continuous load: versions published with
``crossfield publish`` switch in without a failed request, broken versions written by hand
are refused (and counted) while the good one keeps serving, and an admin rollback and
reload switch versions under the same load. Every response names its version, and its
energy must equal that version's in-process energy: a response from a mix of versions, or
labelled with the wrong one, fails."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from hotload_support import (
    SERVING,
    health,
    publish_with_cli,
    repository_server,
    wait_for,
    write_broken_versions,
)
from server_support import request_for, scrape, small_model, structures

from crossfield.model import evaluate, repository
from crossfield.server.security import SecurityConfig
from crossfield.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

ADMIN = (("authorization", "Bearer admin-secret"),)
CLIENT = (("authorization", "Bearer client-secret"),)
UNARY_CLIENTS = 4
RTOL = 1e-9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads spin-wait; with clients, server and batcher sharing two cores
    that only slows every batch down."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Answer:
    sent: float
    version: int
    index: int
    energy: float


class Load:
    """Client threads sending structures in a loop until stopped: unary callers and one
    stream; every answer and every failure is kept."""

    def __init__(self, channel: grpc.Channel, work: list) -> None:
        self.stub = inference_pb2_grpc.InferenceStub(channel)
        self.work = work
        self.stop = threading.Event()
        self.answers: list[list[Answer]] = [[] for _ in range(UNARY_CLIENTS + 1)]
        self.failures: list[str] = []
        self.threads = [
            threading.Thread(target=self._unary, args=(k,), daemon=True)
            for k in range(UNARY_CLIENTS)
        ]
        self.threads.append(threading.Thread(target=self._stream, daemon=True))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _unary(self, client: int) -> None:
        count = 0
        while not self.stop.is_set():
            index = (client + count * UNARY_CLIENTS) % len(self.work)
            count += 1
            sent = time.monotonic()
            try:
                response = self.stub.Compute(
                    request_for(self.work[index], ("energy",)), timeout=60, metadata=CLIENT
                )
            except grpc.RpcError as err:
                self.failures.append(f"unary {client}: {err.code().name}: {err.details()}")
                continue
            self.answers[client].append(Answer(sent, int(response.version), index, response.energy))

    def _stream(self) -> None:
        """Up to eight structures in flight on one stream for the whole run."""
        room = threading.Semaphore(8)
        sent_at: dict[str, float] = {}

        def requests():
            count = 0
            while not self.stop.is_set():
                if not room.acquire(timeout=0.1):
                    continue
                index = count % len(self.work)
                sent_at[str(count)] = time.monotonic()
                yield request_for(self.work[index], ("energy",), id=f"{count}")
                count += 1

        try:
            for response in self.stub.ComputeStream(requests(), timeout=600, metadata=CLIENT):
                room.release()
                if response.status.code:
                    self.failures.append(f"stream: {response.status.message}")
                    continue
                index = int(response.id) % len(self.work)
                self.answers[-1].append(
                    Answer(sent_at[response.id], int(response.version), index, response.energy)
                )
        except grpc.RpcError as err:
            self.failures.append(f"stream: {err.code().name}: {err.details()}")

    def latest(self) -> set[int]:
        """The version of each unary client's last answer."""
        return {answers[-1].version for answers in self.answers[:UNARY_CLIENTS] if answers}

    def count(self) -> int:
        return sum(map(len, self.answers))


def test_publish_corrupt_rollback_and_reload_under_load(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    models = {seed: small_model(seed=seed) for seed in (1, 2, 6)}
    work = structures(8, seed=3)
    energies = {
        version: np.array([float(evaluate(model, [s])[0]["energy"]) for s in work])
        for version, model in models.items()
    }
    repository.publish(models[1], repo, "small", meta={"note": "first"})
    security = SecurityConfig(token="client-secret", admin_token="admin-secret")
    with repository_server(repo, security=security) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        wait_for(lambda: health(channel) == SERVING, "the first version to warm up")
        admin = admin_pb2_grpc.AdminStub(channel)
        marks: dict[str, float] = {}
        with Load(channel, work) as load:
            wait_for(lambda: load.count() >= 40, "answers from version 1")
            v2 = publish_with_cli(models[2], repo, "small", tmp_path)
            assert v2.name == "2"
            wait_for(lambda: load.latest() == {2}, "every client to be answered by version 2")

            broken = write_broken_versions(repo, "small", v2, first=3)

            def refused() -> bool:
                samples = scrape(server)
                key = ("crossfield_model_load_failures_total", frozenset({("model", "small")}))
                return samples.get(key, 0) >= len(broken)

            wait_for(refused, "the broken versions to be refused")
            served = load.count()
            wait_for(lambda: load.count() >= served + 40, "answers after the refusals")
            assert load.latest() == {2}, "a broken version replaced the good one"

            repository.publish(models[6], repo, "small", meta={"note": "after broken ones"})
            wait_for(lambda: load.latest() == {6}, "every client to be answered by version 6")
            marks["monotonic_until"] = time.monotonic()

            admin.UnloadModel(
                admin_pb2.UnloadModelRequest(name="small", version="6"), metadata=ADMIN
            )
            marks["rolled_back"] = time.monotonic()
            wait_for(lambda: load.latest() == {2}, "the rollback to version 2")
            marks["reloading"] = time.monotonic()
            admin.LoadModel(admin_pb2.LoadModelRequest(name="small", version="6"), metadata=ADMIN)
            marks["reloaded"] = time.monotonic()
            wait_for(lambda: load.latest() == {6}, "version 6 to serve again")
            served = load.count()
            wait_for(lambda: load.count() >= served + 20, "answers after the reload")

        info = inference_pb2_grpc.InferenceStub(channel).GetModel(
            inference_pb2.GetModelRequest(name="small"), metadata=CLIENT
        )
        samples = scrape(server)

    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:5]}"
    answers = [a for client in load.answers for a in client]
    assert {a.version for a in answers} == {1, 2, 6}
    for answer in answers:
        expected = energies[answer.version][answer.index]
        assert abs(answer.energy - expected) <= RTOL * abs(expected), (
            f"structure {answer.index} answered as version {answer.version}: {answer.energy} "
            f"!= {expected}"
        )
    for client in load.answers[:UNARY_CLIENTS]:
        versions = [a.version for a in client if a.sent < marks["monotonic_until"]]
        assert versions == sorted(versions), "a client went back to an older version"
        after = {a.version for a in client if marks["rolled_back"] < a.sent < marks["reloading"]}
        assert after <= {2}, f"requests sent after the rollback answered by {after}"
        assert {a.version for a in client if a.sent > marks["reloaded"]} <= {6}
    assert any(a.sent > marks["reloaded"] for a in answers)
    assert (info.version, list(info.versions)) == ("6", ["6"])
    loads = samples[("crossfield_model_loads_total", frozenset({("model", "small")}))]
    assert loads == 5  # 1, 2, 6, the rollback to 2, the reload of 6
    print(
        f"\n{len(answers)} answers, 0 failures; versions {sorted({a.version for a in answers})}; "
        f"{len(broken)} broken versions refused"
    )
