"""The on-disk model repository: ``<repo>/<model-name>/<version>/{model.pt, meta.json}``.

Writers (training's publish, ``import-mace``) and the server's reader share this module so
the layout is defined once. A version appears atomically: it is written into a hidden
temporary folder beside its final name and renamed, so a polling server never sees a
half-written version. Versions are positive integers; the newest is the largest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
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
    """Write ``model`` as a new version (next integer unless given) and return its folder."""
    folder = Path(repo) / check_model_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    if version is None:
        existing = list_versions(repo, name)
        version = (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    final = folder / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists: versions are immutable, publish a new one")
    meta = {"name": name, "version": version, "published_at": time.time(), **(meta or {})}
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{version}."))
    try:
        save_checkpoint(model, staging / CHECKPOINT_NAME, metadata=meta)
        (staging / META_NAME).write_text(json.dumps(meta, indent=2, default=str))
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_meta(repo: str | os.PathLike, name: str, version: int) -> dict[str, Any]:
    return json.loads((version_path(repo, name, version) / META_NAME).read_text())
