"""The training configuration: one tree of dataclasses, read from YAML and from flags.

The YAML file and the command line describe the same tree: ``optimizer: {lr: 0.01}`` in
the file is ``--optimizer.lr 0.01`` on the command line (see ``training/cli.py``), and
the ``model:`` section takes every field of :class:`~crossfield.model.ModelConfig`
except the element table and heads, which come from the data. Unknown keys are errors
that name their full path, because a misspelt option silently ignored costs a whole
training run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase.data import atomic_numbers

from crossfield.training.data import DataKeys
from crossfield.training.loss import LossConfig

E0_FIT = "fit"


@dataclass
class HeadDataConfig:
    """One head to train: its data files, level of theory, E0s and loss weight.

    ``e0s`` is ``"fit"`` (least squares on the training data) or a mapping from element
    (symbol or atomic number) to energy in eV. Without ``valid_file``, ``valid_fraction``
    of the training file is held out. ``scale``/``shift`` override the data statistics.
    """

    name: str = "default"
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    valid_fraction: float = 0.1
    level_of_theory: dict[str, Any] = field(default_factory=dict)
    e0s: Any = E0_FIT
    loss_weight: float = 1.0
    scale: float | None = None
    shift: float | None = None
    keys: DataKeys = field(default_factory=DataKeys)

    @staticmethod
    def from_plain(data: dict[str, Any]) -> dict[str, Any]:
        """Accept ``level_of_theory: PBE`` as ``{method: PBE}``: the short form is what
        people write first, and the method is what a data card records."""
        level = data.get("level_of_theory")
        if isinstance(level, str):
            return {**data, "level_of_theory": {"method": level}}
        return data

    def e0_table(self) -> dict[int, float] | None:
        """The given E0s keyed by atomic number, or None when they are to be fitted."""
        if self.e0s == E0_FIT or self.e0s is None:
            return None
        if not isinstance(self.e0s, dict):
            raise ValueError(
                f"heads[{self.name}].e0s: must be 'fit' or a mapping element -> eV, "
                f"got {self.e0s!r}"
            )
        table = {}
        for key, value in self.e0s.items():
            z = atomic_numbers.get(key) if isinstance(key, str) and not key.isdigit() else int(key)
            if z is None:
                raise ValueError(f"heads[{self.name}].e0s: unknown element {key!r}")
            table[int(z)] = float(value)
        return table


@dataclass
class StatisticsConfig:
    """How scale and shift are computed (``model.avg_num_neighbors``, if given, is kept)."""

    scaling: str = "rms_forces"  # rms_forces | std_energy | none
    shift: str = "mean"  # mean | none


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 0.01
    weight_decay: float = 0.0
    amsgrad: bool = True
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = "plateau"  # plateau | cosine | exponential | none
    factor: float = 0.8  # plateau: lr multiplier on a plateau
    patience: int = 10  # plateau: epochs without improvement before reducing
    gamma: float = 0.99  # exponential: per-epoch lr multiplier
    min_lr: float = 0.0


@dataclass
class FinetuneConfig:
    """Fine-tuning from ``TrainConfig.foundation`` (SCIENCE.md section 7).

    ``mode``: ``replay`` keeps the foundation head (``foundation_head``, default its first)
    and trains it on a replay subset of ``replay_file`` together with the new heads;
    ``naive`` trains the new heads only (the baseline that forgets). ``filter`` restricts
    replay data to the new heads' elements (none / combinations / inclusive / exclusive);
    ``selection`` is ``fps`` (farthest-point sampling on the model's invariant descriptors)
    or ``random``. If the new data are fewer than ``ratio_threshold`` times the replay
    data, they are repeated. ``pseudolabel`` relabels replay data with the foundation
    (when the original labels are unavailable or of another level of theory).
    ``elements``: ``restrict`` the element table to the data's elements, or ``keep`` the
    foundation's table (plus any new elements).
    """

    mode: str = "replay"  # replay | naive
    foundation_head: str | None = None
    replay_file: str | None = None
    replay_valid_fraction: float = 0.1
    replay_keys: DataKeys = field(default_factory=DataKeys)
    num_samples: int = 10000
    selection: str = "fps"  # fps | random
    filter: str = "combinations"  # none | combinations | inclusive | exclusive
    ratio_threshold: float = 0.1
    replay_loss_weight: float = 1.0
    pseudolabel: bool = False
    elements: str = "restrict"  # restrict | keep
    scale_shift: str = "foundation"  # foundation | data: statistics of the new heads


@dataclass
class TrainConfig:
    name: str = "crossfield"
    output_dir: str = "runs/crossfield"
    seed: int = 0
    dtype: str = "float64"  # float64 | float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # CPU threads per process (None: torch's default)
    heads: list[HeadDataConfig] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    epochs: int = 100
    batch_size: int = 8
    valid_batch_size: int = 16
    clip_grad: float | None = 10.0
    ema_decay: float | None = 0.99
    early_stopping_patience: int | None = None
    keep: str = "best"  # best | last: which epoch's (EMA) weights model.pt carries
    resume: bool = True
    progress: bool = True
    foundation: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    publish: str | None = None  # REPO/NAME
    publish_version: int | None = None

    def validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ValueError(f"invalid training config: {name}: {message}")

        if not self.heads:
            fail("heads", "at least one head with a train_file is needed")
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            fail("heads", f"duplicated head names {names}")
        for h in self.heads:
            if not h.train_file:
                fail(f"heads[{h.name}].train_file", "is required")
            if h.loss_weight < 0:
                fail(f"heads[{h.name}].loss_weight", f"must be >= 0, got {h.loss_weight}")
            h.e0_table()
        if self.dtype not in ("float64", "float32"):
            fail("dtype", f"must be float64 or float32, got {self.dtype!r}")
        if self.optimizer.name not in ("adam", "adamw"):
            fail("optimizer.name", f"must be adam or adamw, got {self.optimizer.name!r}")
        if self.scheduler.name not in ("plateau", "cosine", "exponential", "none"):
            fail(
                "scheduler.name",
                f"must be plateau, cosine, exponential or none, got {self.scheduler.name!r}",
            )
        for name in ("epochs", "batch_size", "valid_batch_size"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.keep not in ("best", "last"):
            fail("keep", f"must be best or last, got {self.keep!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            fail("ema_decay", f"must lie in [0, 1), got {self.ema_decay}")
        if self.foundation is not None:
            ft = self.finetune
            if ft.mode not in ("replay", "naive"):
                fail("finetune.mode", f"must be replay or naive, got {ft.mode!r}")
            if ft.mode == "replay" and not ft.replay_file:
                fail(
                    "finetune.replay_file",
                    "replay fine-tuning needs the foundation's training data",
                )
            if ft.selection not in ("fps", "random"):
                fail("finetune.selection", f"must be fps or random, got {ft.selection!r}")
            if ft.filter not in ("none", "combinations", "inclusive", "exclusive"):
                fail(
                    "finetune.filter",
                    f"must be none, combinations, inclusive or exclusive, got {ft.filter!r}",
                )
            if ft.elements not in ("restrict", "keep"):
                fail("finetune.elements", f"must be restrict or keep, got {ft.elements!r}")
            if ft.scale_shift not in ("foundation", "data"):
                fail("finetune.scale_shift", f"must be foundation or data, got {ft.scale_shift!r}")
        if self.model.get("reproduce_cutoff_jump"):
            fail(
                "model.reproduce_cutoff_jump",
                "Crossfield trains only models that are smooth at the cutoff; this option "
                "exists to reproduce imported discontinuous models",
            )
        for key in ("heads",):
            if key in self.model:
                fail(
                    f"model.{key}",
                    "comes from the data and the heads section, not the model section",
                )
        if self.publish is not None and "/" not in self.publish.rstrip("/"):
            fail("publish", f"must be REPO/NAME, got {self.publish!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building the tree from plain data -----------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from nested dicts, naming unknown keys by full path."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    if hasattr(cls, "from_plain"):
        data = cls.from_plain(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config option(s) {[where + k for k in unknown]}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = build_value(hints[name], value, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{path or 'config'}: {err}") from None


def build_value(tp: Any, value: Any, path: str) -> Any:
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [build_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{path}: expected a mapping, got {value!r}")
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{path}: expected a number, got {value!r}") from None
    if tp is int and not isinstance(value, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: expected an integer, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{path}: expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{path}: expected a string, got {value!r}")
    return value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML file (optional), apply dotted-path ``overrides`` and validate.

    Relative data paths in the file are resolved against the file's folder, so a config
    can travel with its data.
    """
    import yaml

    data: dict[str, Any] = {}
    base = None
    if path is not None:
        base = Path(path).resolve().parent
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    config = build(TrainConfig, data)
    if base is not None:
        _resolve_paths(config, base)
    config.validate()
    return config


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; ``head.X`` addresses the first head (created if needed)."""
    parts = dotted.split(".")
    if parts[0] == "head":
        heads = data.setdefault("heads", [])
        if not heads:
            heads.append({})
        target = heads[0]
        parts = parts[1:]
    else:
        target = data
    for key in parts[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ValueError(f"{dotted}: {key} is not a section")
    target[parts[-1]] = value


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    def resolve(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute():
            return value
        return str(base / value)

    for h in config.heads:
        h.train_file, h.valid_file, h.test_file = map(
            resolve, (h.train_file, h.valid_file, h.test_file)
        )
    config.foundation = resolve(config.foundation)
    config.finetune.replay_file = resolve(config.finetune.replay_file)
