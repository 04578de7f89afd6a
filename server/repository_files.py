"""What the repository reads from disk: listings, version fingerprints, version files.

The repository folder is shared with training jobs and operators, so anything can be
found there: folders nobody may read, half-written versions, garbage. Everything here
copes with one bad entry at a time: a listing reports the entries it could not read and
goes on, a fingerprint is None where a file cannot be seen, reading a version raises
ValueError (or OSError) for that version alone. Messages name entries relative to the
repository (``public``): they reach admin clients, which have no business knowing where
the server keeps its files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossfield.model import CrossfieldMACE
from crossfield.model.loading import load_model_file
from crossfield.model.repository import CHECKPOINT_NAME, META_NAME, check_model_name, version_path

Stat = tuple[int, ...] | None
Fingerprint = tuple[Stat, Stat, Stat]


@dataclass
class Listing:
    """One look at the repository: the versions of every model folder that could be
    read, and the entries that could not (those keep whatever they serve)."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)  # model names
    complete: bool = True  # False: the repository folder itself could not be listed
    problems: list[str] = field(default_factory=list)


def look(root: Path) -> Listing:
    """List ``root``'s models and their versions, entry by entry."""
    listing = Listing()
    try:
        entries = sorted(root.iterdir())
    except OSError as err:
        listing.complete = False
        listing.problems.append(f"repository: cannot be listed ({reason(err)})")
        return listing
    for entry in entries:
        try:
            check_model_name(entry.name)
            if not entry.is_dir():
                continue
        except (ValueError, OSError):
            continue  # not a model folder (hidden, staging, a stray file)
        try:
            listing.versions[entry.name] = list_versions(root, entry.name)
        except OSError as err:
            listing.unreadable.add(entry.name)
            listing.problems.append(f"model {entry.name!r}: cannot be listed ({reason(err)})")
    return listing


def list_versions(root: Path, name: str) -> list[int]:
    """The versions in a model folder (OSError when it cannot be read; [] when absent)."""
    folder = root / check_model_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def fingerprint(folder: Path) -> Fingerprint:
    """Cheap identity of a version: its model file's and ``meta.json``'s size, mtime,
    inode, mode and owner, and the folder's mode and owner (None where not visible).

    A changed or newly completed file changes it, and so does a ``chmod`` or ``chown``
    that makes a version refused as unreadable readable: it is then tried again.
    """
    try:
        checkpoint = checkpoint_file(folder)
    except OSError:
        checkpoint = folder / CHECKPOINT_NAME
    folder_stat = _stat(folder)
    return (
        _stat(checkpoint),
        _stat(folder / META_NAME),
        None if folder_stat is None else folder_stat[3:],
    )


def _stat(path: Path) -> Stat:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_mode, stat.st_uid, stat.st_gid)


def checkpoint_file(folder: Path) -> Path:
    """The version's model file: ``model.pt``, or else one mace-torch ``*.model`` file
    dropped in by hand (converted on load, so mace-torch users need no import step)."""
    checkpoint = folder / CHECKPOINT_NAME
    if checkpoint.exists():
        return checkpoint
    mace_files = sorted(folder.glob("*.model"))
    return mace_files[0] if len(mace_files) == 1 else checkpoint


def read_version(root: Path, name: str, version: int) -> tuple[CrossfieldMACE, dict[str, Any]]:
    """The model and metadata of one version; ValueError (or OSError) saying why it cannot
    be served."""
    folder = version_path(root, name, version)
    checkpoint = checkpoint_file(folder)
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint}: missing (a partial version?)")
    meta: dict[str, Any] = {}
    if (folder / META_NAME).is_file():
        try:
            meta = json.loads((folder / META_NAME).read_text())
        except ValueError as err:
            raise ValueError(f"{folder / META_NAME}: not readable JSON ({err})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{folder / META_NAME}: must hold a JSON object")
    expected = meta.get("sha256")
    if expected is not None:
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{checkpoint}: sha256 {digest[:12]}... differs from meta.json's "
                f"{str(expected)[:12]}... (changed or truncated after publishing)"
            )
    # weights_only=True for a checkpoint, the restricted unpickler for a .model: no file runs code
    model = load_model_file(checkpoint)
    metadata = meta or dict(getattr(model, "metadata", {}) or {})
    return model, metadata


def reason(err: OSError) -> str:
    """An OS error without its file name (``Permission denied``)."""
    return err.strerror or type(err).__name__


def public(text: str, root: Path) -> str:
    """``text`` with the repository's location taken out of every path in it."""
    prefixes = {str(root), str(root.resolve()), os.path.abspath(root)}
    for prefix in sorted(prefixes, key=len, reverse=True):  # the longest first
        text = text.replace(prefix + os.sep, "").replace(prefix, "<repository>")
    return text
