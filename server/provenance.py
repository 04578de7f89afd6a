"""What of a version's metadata clients see: provenance by names, digests and dates, never
by where files lay.

``meta.json`` and checkpoint metadata are written by training jobs, import scripts and
operators. Older versions (the shipped default model among them) name their data files,
parent checkpoint and output folder by absolute path, and ``ListModels`` showed any
client 19 paths of the machines involved. Every absolute path in the metadata, alone or
inside a longer string, is replaced by its file name when a version is served; a file
described by ``{"path": ..., "sha256": ...}`` becomes ``{"name": ..., "sha256": ...}``,
so it is still identified by its name and digest.
"""

from __future__ import annotations

import re
from typing import Any

# POSIX absolute paths (/a/b, ~/a, file:///a/b) and Windows ones (C:\a\b), up to the first
# blank or quote; not the path part of a URL (https://host/a).
_PATH = re.compile(r"file://[^\s'\"<>|]*|(?<![\w.:/~-])(?:~?/|[A-Za-z]:\\)[^\s'\"<>|]*")


def public_metadata(data: Any) -> Any:
    """A copy of ``data`` (JSON-like) with every absolute path reduced to its file name."""
    if isinstance(data, dict):
        cleaned = {str(k): public_metadata(v) for k, v in data.items()}
        if isinstance(data.get("path"), str) and "name" not in cleaned:
            cleaned["name"] = cleaned.pop("path")
        return cleaned
    if isinstance(data, (list, tuple)):
        return [public_metadata(v) for v in data]
    if isinstance(data, str):
        return _PATH.sub(lambda match: _name(match.group(0)), data)
    return data


def _name(path: str) -> str:
    """The last component of ``path`` (``~`` for a home folder itself)."""
    parts = [p for p in re.split(r"[/\\]", path.removeprefix("file://")) if p]
    return parts[-1] if parts else "/"
