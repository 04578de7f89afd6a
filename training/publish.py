"""Publishing a checkpoint into a model repository: ``<repo>/<name>/<version>/``.

The layout and the atomic write live in ``crossfield.model.repository`` (shared with
``import-mace`` and the server); this module adds what training knows: ``meta.json``
with provenance, model config, heads with their levels of theory, per-head metrics and
the parent model.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crossfield.model import repository


def build_meta(checkpoint: Path, extra: dict[str, Any] | None) -> dict[str, Any]:
    """meta.json content from the checkpoint's own config and training metadata."""
    from crossfield.model import load_checkpoint

    # Loading the whole model refuses a corrupt or inconsistent file before it is published.
    model = load_checkpoint(checkpoint)
    metadata = dict(getattr(model, "metadata", {}) or {})
    config = model.config.to_dict()
    return {
        "published": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": repository.CHECKPOINT_NAME,
        "dtype": str(model.dtype).removeprefix("torch."),
        "elements": config["elements"],
        "heads": [
            {
                "name": h["name"],
                "level_of_theory": h["level_of_theory"],
                "elements": h["elements"],
                "systems": h["systems"],
            }
            for h in config["heads"]
        ],
        "metrics": metadata.get("metrics", {}),
        "parent": metadata.get("parent"),
        "provenance": {
            "source_checkpoint": checkpoint.name,
            "source_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "created": metadata.get("created"),
            "training_name": metadata.get("name"),
            **(metadata.get("provenance") or {}),
        },
        "training": metadata.get("training"),
        "config": config,
        **(extra or {}),
    }


def publish(
    checkpoint: str | os.PathLike,
    repo: str | os.PathLike,
    name: str,
    version: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Publish ``checkpoint`` as a new version of ``name``; returns the version folder."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    meta = build_meta(checkpoint, extra)
    return repository.publish_checkpoint(checkpoint, repo, name, meta=meta, version=version)
