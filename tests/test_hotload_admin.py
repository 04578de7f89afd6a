"""The repository without polling, driven by the Admin RPCs: readiness before the first
model, ReloadRepository, version policies (latest, latest:N from config.json, pins),
pinned requests, unload/rollback/reload, broken, changed and removed versions, refused
arguments, and the admin token."""

from __future__ import annotations

import hashlib
import json
import shutil

import grpc
import numpy as np
import pytest
from hotload_support import NOT_SERVING, SERVING, health, repository_server, wait_for
from server_support import request_for, small_model, structures

from crossfield.model import evaluate, repository
from crossfield.model.repository import CHECKPOINT_NAME, META_NAME, version_path
from crossfield.server.repository import VersionPolicy
from crossfield.server.security import SecurityConfig
from crossfield.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

ADMIN = (("authorization", "Bearer admin-secret"),)
CLIENT = (("authorization", "Bearer client-secret"),)


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=30, **kwargs)
    return raised.value.code()


def test_version_policies_select_versions() -> None:
    available = [1, 2, 5, 7]
    assert VersionPolicy.parse("latest").select(available) == [7]
    assert VersionPolicy.parse("latest:2").select(available) == [5, 7]
    assert VersionPolicy.parse("all").select(available) == available
    assert VersionPolicy.parse("specific:2,3,5").select(available) == [2, 5]
    for bad in ("newest", "latest:0", "specific:", "specific:a", "all:2", "specific:-1"):
        with pytest.raises(ValueError, match="version_policy"):
            VersionPolicy.parse(bad)


def test_admin_rpcs_drive_the_repository(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    water = structures(1, seed=5)[0]
    models = {version: small_model(seed=10 + version) for version in (1, 2)}
    energy = {v: float(evaluate(m, [water])[0]["energy"]) for v, m in models.items()}
    security = SecurityConfig(token="client-secret", admin_token="admin-secret")
    with repository_server(repo, poll_interval=0, security=security) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        inference = inference_pb2_grpc.InferenceStub(channel)
        admin = admin_pb2_grpc.AdminStub(channel)

        def compute(version: str = "") -> tuple[str, float]:
            request = request_for(water, ("energy",))
            request.version = version
            response = inference.Compute(request, timeout=30, metadata=CLIENT)
            return response.version, response.energy

        # Nothing published: listening, not ready, and requests are told to retry.
        assert health(channel) == NOT_SERVING
        assert code_of(inference.Compute, request_for(water), metadata=CLIENT) == (
            grpc.StatusCode.UNAVAILABLE
        )

        # The admin token guards every admin call.
        reload = admin.ReloadRepository
        empty = admin_pb2.ReloadRepositoryRequest()
        assert code_of(reload, empty) == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer admin-secreT"),)
        assert code_of(reload, empty, metadata=wrong) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(reload, empty, metadata=CLIENT) == grpc.StatusCode.PERMISSION_DENIED

        repository.publish(models[1], repo, "small")
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert [(m.name, m.version) for m in answer.loaded] == [("small", "1")]
        assert health(channel) == SERVING
        assert compute() == ("1", pytest.approx(energy[1], rel=1e-9))

        # latest: a new version replaces the old one.
        repository.publish(models[2], repo, "small")
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert [m.version for m in answer.loaded] == ["2"] and not answer.errors
        listed = inference.ListModels(inference_pb2.ListModelsRequest(), metadata=CLIENT)
        assert [m.version for m in listed.models] == ["2"]

        # Pin version 1 beside the policy's version; requests can ask for either.
        load = admin.LoadModel
        info = load(admin_pb2.LoadModelRequest(name="small", version="1"), metadata=ADMIN).model
        assert (info.version, list(info.versions), info.latest) == ("1", ["1", "2"], False)
        assert compute() == ("2", pytest.approx(energy[2], rel=1e-9))
        assert compute("1") == ("1", pytest.approx(energy[1], rel=1e-9))
        missing = request_for(water)
        missing.version = "7"
        assert code_of(inference.Compute, missing, metadata=CLIENT) == grpc.StatusCode.NOT_FOUND

        # Unloading the newest rolls back to version 1; unloading all stops serving.
        unload = admin.UnloadModel
        gone = unload(admin_pb2.UnloadModelRequest(name="small", version="2"), metadata=ADMIN)
        assert [m.version for m in gone.unloaded] == ["2"]
        assert compute() == ("1", pytest.approx(energy[1], rel=1e-9))
        reload(empty, timeout=60, metadata=ADMIN)  # an unloaded version stays unloaded
        assert compute() == ("1", pytest.approx(energy[1], rel=1e-9))
        gone = unload(admin_pb2.UnloadModelRequest(name="small"), metadata=ADMIN)
        assert [m.version for m in gone.unloaded] == ["1"]
        assert health(channel) == NOT_SERVING
        assert code_of(inference.Compute, request_for(water), metadata=CLIENT) == (
            grpc.StatusCode.UNAVAILABLE
        )
        info = load(admin_pb2.LoadModelRequest(name="small"), metadata=ADMIN).model
        assert (info.version, info.latest) == ("2", True)
        assert health(channel) == SERVING

        # A per-model config.json policy: the two newest versions.
        (repo / "small" / "config.json").write_text(json.dumps({"version_policy": "latest:2"}))
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert [m.version for m in answer.loaded] == ["1"]

        # A broken version is refused with its reason; nothing changes.
        broken = version_path(repo, "small", 3)
        broken.mkdir()
        (broken / CHECKPOINT_NAME).write_bytes(b"\x80\x02garbage")
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert not answer.loaded and "version 3 refused" in answer.errors[0]
        request = admin_pb2.LoadModelRequest(name="small", version="3")
        with pytest.raises(grpc.RpcError) as raised:
            load(request, timeout=60, metadata=ADMIN)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not a readable Crossfield checkpoint" in raised.value.details()
        listed = inference.ListModels(inference_pb2.ListModelsRequest(), metadata=CLIENT)
        assert [m.version for m in listed.models] == ["1", "2"]

        # A version changed in place: refused while its digest disagrees with meta.json
        # (the loaded copy keeps serving), reloaded once the change is consistent.
        v1, v2 = version_path(repo, "small", 1), version_path(repo, "small", 2)
        shutil.copyfile(v1 / CHECKPOINT_NAME, v2 / CHECKPOINT_NAME)
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert not answer.loaded and "sha256" in answer.errors[0]
        assert compute() == ("2", pytest.approx(energy[2], rel=1e-9))
        meta = json.loads((v2 / META_NAME).read_text())
        meta["sha256"] = hashlib.sha256((v2 / CHECKPOINT_NAME).read_bytes()).hexdigest()
        (v2 / META_NAME).write_text(json.dumps(meta))
        answer = reload(empty, timeout=60, metadata=ADMIN)
        assert [m.version for m in answer.loaded] == ["2"]
        assert compute() == ("2", pytest.approx(energy[1], rel=1e-9))

        # A version removed from the repository is unloaded.
        shutil.rmtree(v1)
        reload(empty, timeout=60, metadata=ADMIN)
        listed = inference.ListModels(inference_pb2.ListModelsRequest(), metadata=CLIENT)
        assert [m.version for m in listed.models] == ["2"]

        # Names and versions only: never a path.
        for name, version, status in [
            ("../small", "", grpc.StatusCode.INVALID_ARGUMENT),
            (str(repo / "small"), "", grpc.StatusCode.INVALID_ARGUMENT),
            ("small", "../1", grpc.StatusCode.INVALID_ARGUMENT),
            ("small", "0", grpc.StatusCode.INVALID_ARGUMENT),
            ("other", "", grpc.StatusCode.NOT_FOUND),
            ("small", "9", grpc.StatusCode.NOT_FOUND),
        ]:
            request = admin_pb2.LoadModelRequest(name=name, version=version)
            assert code_of(load, request, metadata=ADMIN) == status, (name, version)
        assert np.isfinite(compute()[1])


def test_health_turns_serving_when_polling_finds_the_first_version(tmp_path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    with repository_server(repo, poll_interval=0.1) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        assert health(channel) == NOT_SERVING
        assert health(channel, "crossfield.v1.Inference") == NOT_SERVING
        repository.publish(small_model(seed=4), repo, "small")
        wait_for(lambda: health(channel) == SERVING, "health to turn SERVING")
        # Admin calls are refused outright when no admin token is configured.
        admin = admin_pb2_grpc.AdminStub(channel)
        status = code_of(admin.ReloadRepository, admin_pb2.ReloadRepositoryRequest())
        assert status == grpc.StatusCode.PERMISSION_DENIED
