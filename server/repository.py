"""Serve what a model repository holds, and follow it while it changes.

The layout is ``crossfield.model.repository``'s: ``<repo>/<name>/<version>/model.pt`` with
``meta.json``, integer versions, hidden staging folders. Which versions of a model are
served is its *version policy*: ``latest`` (the default), ``latest:N``, ``all`` or
``specific:1,3``, set for every model on the command line and per model in
``<repo>/<name>/config.json`` as ``{"version_policy": "latest:2"}``. The same file can
choose the model's inference backend, ``{"backend": "compile"}`` (see
``crossfield.model.backends``); a changed backend applies to versions loaded after it.

A scan (every ``poll_interval`` seconds, and on the Admin RPCs) compares the policy's
versions with what is loaded. A version to add is read (``weights_only``, its sha256
checked against ``meta.json``), moved to the device, prepared and warmed by a test
evaluation, all in the scanning thread while the current versions keep serving; only then
does it enter the registry, in one atomic step. A version to drop leaves the registry first
and is released after its batcher drains, so batches in flight finish on the version that
started them. A changed checkpoint of a loaded version is reloaded the same way.

A version that cannot be served (missing, unreadable or truncated file, foreign or newer
format, a config larger than its weights, weights that do not fit their architecture, a
digest mismatch, a failing warm-up) is refused: logged, counted in
``crossfield_model_load_failures_total``, remembered by its fingerprint (files' size,
times, mode and owner, see ``repository_files.fingerprint``) so that it is not retried
until it changes (a ``chmod`` counts), and left out when the policy picks versions. The
policy then falls back to the next good version, so a broken version never replaces a
good one. An entry that cannot even be listed is reported and skipped; it keeps serving
what it served and never stops the scan of the others. Reports name entries relative to
the repository, never by absolute path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossfield.model import CrossfieldMACE
from crossfield.model.backends import BACKEND_CHOICES
from crossfield.model.repository import check_model_name, version_path

from .errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from .metrics import Metrics
from .models import ModelRegistry, ServedModel, retire
from .repository_files import (
    Fingerprint,
    fingerprint,
    list_versions,
    look,
    public,
    read_version,
    reason,
)

__all__ = ["ModelRepository", "VersionPolicy", "fingerprint", "read_version"]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

# (model, name, version, metadata, backend or None for the server's) -> a warmed
# ServedModel, or an exception
Serve = Callable[[CrossfieldMACE, str, str, dict[str, Any], str | None], ServedModel]


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the newest ``latest`` (None: all of them), or
    exactly the ``specific`` versions that exist."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest``, ``latest:N``, ``all`` or ``specific:V1,V2,...``."""
        kind, _, value = text.strip().partition(":")
        try:
            if kind == "latest":
                count = int(value) if value else 1
                if count < 1:
                    raise ValueError
                return cls(latest=count)
            if kind == "all" and not value:
                return cls(latest=None)
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in value.split(",")}))
                if not versions or versions[0] < 1:
                    raise ValueError
                return cls(latest=None, specific=versions)
        except ValueError:
            pass
        raise ValueError(
            f"version_policy: {text!r} is not one of 'latest', 'latest:N' (N >= 1), 'all', "
            "'specific:V1,V2' (positive integers)"
        )

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve among ``available`` (ascending)."""
        if self.specific:
            return [v for v in sorted(available) if v in self.specific]
        ordered = sorted(available)
        return ordered if self.latest is None else ordered[-self.latest :]

    def __str__(self) -> str:
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        return "all" if self.latest is None else f"latest:{self.latest}"


@dataclass(frozen=True)
class ModelSettings:
    """A model's ``config.json``: its version policy, and its backend (None: the server's)."""

    policy: VersionPolicy
    backend: str | None = None


SETTINGS_FIELDS = ("version_policy", "backend")


def read_settings(root: Path, name: str, default: VersionPolicy) -> ModelSettings:
    """The model's ``config.json`` settings, else the defaults; ValueError when unreadable
    or invalid, naming the file and the field."""
    path = root / name / CONFIG_NAME
    try:
        if not path.is_file():
            return ModelSettings(default)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    unknown = set(config) - set(SETTINGS_FIELDS)
    if unknown:
        raise ValueError(
            f"{path}: unknown fields {sorted(unknown)}; known: {list(SETTINGS_FIELDS)}"
        )
    policy = default
    if "version_policy" in config:
        try:
            policy = VersionPolicy.parse(str(config["version_policy"]))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    backend = config.get("backend")
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"{path}: backend: {backend!r} is not one of {list(BACKEND_CHOICES)}")
    return ModelSettings(policy, backend)


@dataclass
class ModelState:
    """What the repository knows about one model name beyond its policy."""

    loaded: dict[int, tuple[ServedModel, Fingerprint]] = field(default_factory=dict)
    refused: dict[int, Fingerprint] = field(default_factory=dict)  # not retried until changed
    pinned: set[int] = field(default_factory=set)  # loaded by an admin, outside the policy
    excluded: set[int] = field(default_factory=set)  # unloaded by an admin
    disabled: bool = False  # the whole model unloaded by an admin
    policy_error: str = ""


@dataclass
class ScanReport:
    loaded: list[ServedModel] = field(default_factory=list)
    retired: list[ServedModel] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def merge(self, other: ScanReport) -> None:
        self.loaded += other.loaded
        self.retired += other.retired
        self.errors += other.errors


class ModelRepository:
    """Keeps the registry in line with a repository folder; see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        registry: ModelRegistry,
        serve: Serve,
        metrics: Metrics,
        default_policy: VersionPolicy | None = None,
        poll_interval: float = 10.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = Path(root)
        self.default_policy = default_policy or VersionPolicy()
        self.poll_interval = poll_interval
        self._registry = registry
        self._serve = serve
        self._metrics = metrics
        self._on_change = on_change
        self._states: dict[str, ModelState] = {}
        # One load or admin change at a time; held for one version at a time, never for a
        # whole scan, so an admin call waits for at most one load.
        self._lock = threading.RLock()
        self._problems: set[str] = set()  # reported by the last scan (logged once each)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Scan once in the background, then every ``poll_interval`` seconds (0: never
        again; the Admin RPCs still work)."""
        self._thread = threading.Thread(target=self._poll, name="repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; a load in progress finishes first. Loaded versions stay (the
        server drains them on its own stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # a scan must never end polling
                log.exception("scanning the model repository %s failed", self.root)
            if self.poll_interval <= 0 or self._stop.wait(self.poll_interval):
                return

    # -- operations -------------------------------------------------------------------------
    def scan(self) -> ScanReport:
        """Bring every model in line with the repository and its policy.

        An entry that cannot be read is reported (and logged once, not every poll) and
        left alone: a model folder nobody may list keeps serving what it served, the
        other models are scanned as usual.
        """
        report = ScanReport()
        listing = look(self.root)
        report.errors += self._note_problems(listing.problems)
        with self._lock:
            loaded = {name for name, state in self._states.items() if state.loaded}
        gone = loaded - set(listing.versions) - listing.unreadable if listing.complete else set()
        for name in sorted(set(listing.versions) | gone):
            report.merge(self._sync(name, listing.versions.get(name, [])))
        return report

    def _note_problems(self, problems: list[str]) -> list[str]:
        """Log the listing problems that are new since the last scan; returns them all."""
        with self._lock:
            new, resolved = set(problems) - self._problems, self._problems - set(problems)
            self._problems = set(problems)
        for problem in sorted(new):
            log.error("model repository: %s; skipped, what it serves stays", problem)
        for problem in sorted(resolved):
            log.info("model repository: resolved: %s", problem)
        return problems

    def load(self, name: str, version: str = "") -> ServedModel:
        """Admin LoadModel: serve ``version`` (empty: the newest in the repository) of
        ``name`` now, retrying it even if it was refused before. An explicit version stays
        loaded beside the policy's versions until an admin unloads it."""
        name = _model_name(name)
        with self._lock:
            available = self._versions_of(name)
            if not available:
                raise NotFoundError(f"name: no model {name!r} in the repository")
            number = _version_number(version) if version else available[-1]
            if number not in available:
                raise NotFoundError(
                    f"version: model {name!r} has no version {number} in the repository; "
                    f"versions: {available}"
                )
            try:
                policy = read_settings(self.root, name, self.default_policy).policy
            except ValueError as err:
                raise FailedPreconditionError(public(str(err), self.root)) from None
            state = self._states.setdefault(name, ModelState())
            state.disabled = False
            state.excluded.discard(number)
            state.refused.pop(number, None)
            if version or number not in policy.select(available):
                state.pinned.add(number)
            report = self._sync(name, available)
            if number not in state.loaded:
                state.pinned.discard(number)
                reason = "; ".join(report.errors) or "not selected"
                raise FailedPreconditionError(
                    f"version: model {name!r} version {number} was not loaded: {reason}"
                )
            return state.loaded[number][0]

    def unload(self, name: str, version: str = "") -> list[ServedModel]:
        """Admin UnloadModel: stop serving ``version`` (empty: every version) of ``name``
        until an admin loads it again. Unloading the newest version of a ``latest`` policy
        falls back to the next version (a rollback), loaded before the other leaves."""
        name = _model_name(name)
        with self._lock:
            state = self._states.get(name)
            if state is None or not state.loaded:
                raise NotFoundError(f"name: model {name!r} is not loaded")
            if version:
                number = _version_number(version)
                if number not in state.loaded:
                    raise NotFoundError(
                        f"version: model {name!r} version {number} is not loaded; "
                        f"loaded: {sorted(state.loaded)}"
                    )
                state.excluded.add(number)
                state.pinned.discard(number)
            else:
                state.disabled = True
                state.pinned.clear()
            return self._sync(name, self._versions_of(name)).retired

    def _versions_of(self, name: str) -> list[int]:
        """A model's versions for an admin call; FAILED_PRECONDITION when unreadable."""
        try:
            return list_versions(self.root, name)
        except OSError as err:
            raise FailedPreconditionError(
                f"name: model {name!r} cannot be listed ({reason(err)})"
            ) from None

    # -- the one place versions change -------------------------------------------------------
    def _sync(self, name: str, available: list[int]) -> ScanReport:
        """Load what the policy wants among ``available`` (newest first), then retire what
        it no longer wants.

        The versions are fingerprinted once (a model with a thousand refused versions
        costs a thousand ``stat`` calls, not a million); the one about to be loaded is
        fingerprinted again just before, since it may have changed meanwhile. The lock is
        taken for one version at a time, so admin calls interleave with a long scan.
        Retirement looks only at versions that are loaded: a wanted version that did not
        load (refused, changed while being read, or the server stopping) never retires the
        version that serves in its place.
        """
        report = ScanReport()
        prints = {v: fingerprint(version_path(self.root, name, v)) for v in available}
        try:
            settings = read_settings(self.root, name, self.default_policy)
            policy, backend, problem = settings.policy, settings.backend, ""
        except ValueError as err:  # keep what is loaded; admin unloads still apply
            policy, backend, problem = None, None, public(str(err), self.root)
            report.errors.append(problem)
        with self._lock:
            state = self._states.setdefault(name, ModelState())
            if problem and problem != state.policy_error:
                log.error("model %r: %s; loading nothing new for it", name, problem)
            state.policy_error = problem
        attempted: set[int] = set()
        while policy is not None and not self._stop.is_set():
            with self._lock:
                todo = [
                    v
                    for v in sorted(self._wanted(state, policy, available, prints), reverse=True)
                    if v not in attempted  # the newest first: it serves soonest
                    and (v not in state.loaded or state.loaded[v][1] != prints[v])
                    and state.refused.get(v) != prints[v]
                ]
                if not todo:
                    break
                version = todo[0]
                attempted.add(version)
                prints[version] = fingerprint(version_path(self.root, name, version))
                self._load(state, name, version, prints[version], backend, report)
        with self._lock:
            loaded = [v for v in available if v in state.loaded]
            keep = self._wanted(state, policy or VersionPolicy(latest=None), loaded, {})
            leaving = [state.loaded.pop(v)[0] for v in sorted(set(state.loaded) - keep)]
            for served in leaving:
                self._registry.remove(name, served.version)
            if leaving:
                self._on_change()
        for served in leaving:  # drains outside the lock: batches in flight finish first
            retire(served, self._metrics)
            log.info("model %r version %s unloaded (drained)", name, served.version)
            report.retired.append(served)
        return report

    @staticmethod
    def _wanted(
        state: ModelState, policy: VersionPolicy, available: list[int], prints: dict
    ) -> set[int]:
        """The versions to serve: the policy's pick among the versions that can serve (a
        refused version is skipped unless a good copy of it is loaded), plus pins."""
        if state.disabled:
            return set()
        candidates = [
            v
            for v in available
            if v not in state.excluded and (v in state.loaded or state.refused.get(v) != prints[v])
        ]
        return set(policy.select(candidates)) | (state.pinned & set(candidates))

    def _load(
        self,
        state: ModelState,
        name: str,
        version: int,
        prints: Fingerprint,
        backend: str | None,
        report: ScanReport,
    ) -> None:
        start = time.monotonic()
        try:
            model, metadata = read_version(self.root, name, version)
            served = self._serve(model, name, str(version), metadata, backend)
        except Exception as err:  # any failure refuses this version, never the server
            message = public(f"model {name!r} version {version} refused: {err}", self.root)
            log.error("%s; the serving versions stay", message)
            self._metrics.model_load_failures.labels(name).inc()
            state.refused[version] = prints
            report.errors.append(message)
            return
        previous = self._registry.add(served, replace=True)
        state.loaded[version] = (served, prints)
        state.refused.pop(version, None)
        self._metrics.model_loads.labels(name).inc()
        self._on_change()
        log.info(
            "model %r version %d loaded and warmed in %.1f s",
            name,
            version,
            time.monotonic() - start,
        )
        report.loaded.append(served)
        if previous is not None:  # a changed checkpoint: the old copy drains
            retire(previous, self._metrics)


def _model_name(name: str) -> str:
    """A repository model name, never a path (no separators, no '..')."""
    try:
        return check_model_name(name)
    except ValueError as err:
        raise InvalidArgumentError(f"name: {err}") from None


def _version_number(version: str) -> int:
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgumentError(
            f"version: {version!r} is not a repository version (a positive integer)"
        )
    return int(version)
