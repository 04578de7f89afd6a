"""Backends behind a real server: chosen per server and per repository model, compiled at
load time (never on a request), and answering with eager's numbers over gRPC.

TorchScript carries the server tests here because it traces in seconds; the torch.compile
path through the server is in ``test_backends_compile.py``, where it reuses the graphs
that file's first test compiles (compiling costs minutes on the CI machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from backends_support import structure_pool, tiny_model
from hotload_support import repository_server
from server_support import assert_close, request_for, running_server, scrape, stub

from crossfield.model import evaluate, repository
from crossfield.server.models import Backend
from crossfield.v1 import inference_pb2
from crossfield.v1.messages import response_results


def compute_all(server, structures, model: str) -> list[dict]:
    """Every structure on one stream, so the server batches them together."""
    requests = [
        request_for(
            s,
            ("energy", "forces", "stress") if any(s.pbc) else ("energy", "forces"),
            model=model,
            id=str(i),
        )
        for i, s in enumerate(structures)
    ]
    answers = {r.id: r for r in stub(server).ComputeStream(iter(requests), timeout=120)}
    assert sorted(answers, key=int) == [str(i) for i in range(len(structures))]
    return [response_results(answers[str(i)]) for i in range(len(structures))]


def test_script_backend_serves_eager_numbers(tmp_path) -> None:
    model = tiny_model()
    work = structure_pool(seed=3) + structure_pool(seed=4)
    want = evaluate(model, work)
    with running_server({"tiny": model}, backend=Backend("script", tmp_path)) as server:
        info = stub(server).GetModel(inference_pb2.GetModelRequest(name="tiny"), timeout=10)
        got = compute_all(server, work, "tiny")
        metrics = scrape(server)
    assert info.backend == "script"
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g["energy"], w["energy"], f"energy {index}")
        assert_close(g["forces"], w["forces"], f"forces {index}")
        if "stress" in g:
            assert_close(g["stress"], w["stress"], f"stress {index}")
    labels = frozenset({("model", "tiny"), ("version", "1"), ("backend", "script")})
    assert metrics[("crossfield_model_compile_seconds", labels)] > 0
    assert list(tmp_path.glob("script-*.pt")), "the trace was not cached on disk"


def write_config(repo, name: str, config: dict) -> None:
    (repo / name / "config.json").write_text(json.dumps(config))


def test_repository_config_chooses_each_models_backend(tmp_path) -> None:
    """config.json picks a model's backend; a wrong one refuses that model alone, naming
    the field; models without one take the server's backend."""
    repo = tmp_path / "repo"
    repo.mkdir()
    model = tiny_model()
    for name in ("traced", "plain", "wrong"):
        repository.publish(model, repo, name)
    write_config(repo, "traced", {"backend": "script"})
    write_config(repo, "wrong", {"backend": "warp"})
    backend = Backend("eager", tmp_path / "cache")
    with repository_server(repo, poll_interval=0, backend=backend) as server:
        report = server.repository.scan()
        listed = stub(server).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        backends = {m.name: m.backend for m in listed.models}
        work = structure_pool(seed=5)[:6]
        traced = compute_all(server, work, "traced")
    assert backends == {"traced": "script", "plain": "eager"}
    assert any("backend: 'warp' is not one of" in e and "wrong" in e for e in report.errors)
    for g, w in zip(traced, evaluate(model, work)):
        assert_close(g["forces"], w["forces"], "forces through the traced repository model")


def test_a_model_the_backend_cannot_run_is_refused_not_served(tmp_path, caplog) -> None:
    """TorchScript cannot trace per-element product weights: the version is refused with
    the reason, and the other model keeps serving."""
    repo = tmp_path / "repo"
    repo.mkdir()
    repository.publish(tiny_model("element"), repo, "per_element")
    repository.publish(tiny_model(), repo, "agnostic")
    with repository_server(repo, poll_interval=0, backend=Backend("script", tmp_path)) as server:
        server.repository.scan()  # after the scan at start: refused versions stay refused
        listed = stub(server).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        metrics = scrape(server)
    assert [m.name for m in listed.models] == ["agnostic"]
    refusals = [r.message for r in caplog.records if "'per_element' version 1 refused" in r.message]
    assert len(refusals) == 1 and "config.product = 'element'" in refusals[0]
    failures = metrics[
        ("crossfield_model_load_failures_total", frozenset({("model", "per_element")}))
    ]
    assert failures == 1


def test_serve_has_no_tensorrt_backend() -> None:
    """TensorRT never ran (issue 17), so it is no choice: refused before anything loads."""
    command = [sys.executable, "-m", "crossfield.cli", "serve", "--backend", "tensorrt"]
    env = {**os.environ, "CROSSFIELD_TOKEN": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "argument --backend: invalid choice: 'tensorrt'" in done.stderr, done.stderr
