"""The on-disk model repository: ``<repo>/<model-name>/<version>/{model.pt, meta.json}``.

Writers (training's publish, ``import-mace``) and the server's reader share this module so
the layout is defined once. A version appears atomically: it is written into a hidden
temporary folder beside its final name and renamed, so a polling server never sees a
half-written version. Versions are positive integers (the newest is the largest), so
"latest" and "latest N" policies are well defined; concurrent publishers each get their
own number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import save_checkpoint
from .mace import CrossfieldMACE

CHECKPOINT_NAME = "model.pt"
META_NAME = "meta.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (no path separators), "
            "starting with a letter or digit"
        )
    return name


def list_versions(repo: str | os.PathLike, name: str) -> list[int]:
    """Complete versions of a model, oldest first (temporary folders are ignored)."""
    folder = Path(repo) / check_model_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def list_models(repo: str | os.PathLike) -> list[str]:
    root = Path(repo)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and _NAME.match(p.name) and list_versions(root, p.name)
    )


def version_path(repo: str | os.PathLike, name: str, version: int) -> Path:
    return Path(repo) / check_model_name(name) / str(int(version))


def publish(
    model: CrossfieldMACE,
    repo: str | os.PathLike,
    name: str,
    meta: dict[str, Any] | None = None,
    version: int | None = None,
) -> Path:
    """Write ``model`` as a new version (next integer unless given); returns its folder."""
    return _publish(
        lambda path: save_checkpoint(model, path, metadata=meta), repo, name, meta, version
    )


def publish_checkpoint(
    checkpoint: str | os.PathLike,
    repo: str | os.PathLike,
    name: str,
    meta: dict[str, Any] | None = None,
    version: int | None = None,
) -> Path:
    """Copy an existing checkpoint file in as a new version; returns its folder."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    return _publish(lambda path: shutil.copyfile(checkpoint, path), repo, name, meta, version)


def _publish(
    write_checkpoint: Callable[[Path], Any],
    repo: str | os.PathLike,
    name: str,
    meta: dict[str, Any] | None,
    version: int | None,
) -> Path:
    folder = Path(repo) / check_model_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    if version is not None and int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        write_checkpoint(staging / CHECKPOINT_NAME)
        _fsync(staging / CHECKPOINT_NAME)
        digest = hashlib.sha256((staging / CHECKPOINT_NAME).read_bytes()).hexdigest()
        while True:
            chosen = (
                int(version) if version is not None else (list_versions(repo, name) or [0])[-1] + 1
            )
            target = folder / str(chosen)
            if target.exists():
                if version is not None:
                    raise FileExistsError(f"{target} already exists: versions are immutable")
                continue
            content = {
                "name": name,
                "version": chosen,
                "published_at": time.time(),
                "sha256": digest,
            }
            (staging / META_NAME).write_text(
                json.dumps({**content, **(meta or {})}, indent=1, default=str)
            )
            _fsync(staging / META_NAME)
            try:
                os.rename(staging, target)  # atomic; fails if another publisher took the name
            except OSError:
                if version is not None or not target.exists():
                    raise
                continue
            _fsync(folder)
            return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(repo: str | os.PathLike, name: str, version: int) -> dict[str, Any]:
    return json.loads((version_path(repo, name, version) / META_NAME).read_text())
