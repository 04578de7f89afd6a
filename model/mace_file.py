"""Read mace-torch ``.model`` files without executing any code from them.

A ``.model`` file is a pickle of the whole ``torch.nn.Module``. Unpickling it normally
imports mace (and the e3nn version it was written with) and runs whatever the pickle asks
for; torch.fx graph modules inside even ``exec`` generated source. We instead resolve every
global outside a small allow-list of tensor-rebuilding functions to an inert stand-in
class that only records its arguments and ``__dict__``. The module tree comes back as
plain objects with ``_modules``, ``_parameters`` and ``_buffers``, which is all
``mace_import`` needs. Files written under any e3nn version read the same way.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import types
from typing import Any

import torch

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "device"): torch.device,
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class Opaque:
    """Stand-in for a class or function from the file; records what it was given."""

    __qualified_name__ = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return Opaque(*args)

    # ``list``/``dict`` subclasses in the file (e.g. e3nn Irreps, torch containers) are
    # rebuilt through these when the pickle extends or sets items.
    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_mapping", {})[key] = value


def _opaque_class(module: str, name: str) -> type:
    return types.new_class(
        name, (Opaque,), exec_body=lambda ns: ns.update(__qualified_name__=f"{module}.{name}")
    )


class _Unpickler(pickle.Unpickler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = _opaque_class(module, name)
        return self._classes[key]


class _PickleModule(types.ModuleType):
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler and a load function."""

    Unpickler = _Unpickler

    def __init__(self) -> None:
        super().__init__("crossfield_restricted_pickle")

    @staticmethod
    def load(file: io.BufferedIOBase, **kwargs: Any) -> Any:
        return _Unpickler(file, **kwargs).load()


def read_mace_file(path: str | os.PathLike) -> Any:
    """The module tree of a mace-torch ``.model`` file, as inert objects.

    Raises ``ValueError`` when the file is not a pickled model.
    """
    try:
        tree = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PickleModule()
        )
    except FileNotFoundError:
        raise
    except Exception as err:  # corrupt archives raise many types
        raise ValueError(
            f"{path}: cannot read as a mace-torch model file ({type(err).__name__}: {err})"
        ) from err
    if isinstance(tree, dict) and "model" in tree:  # training checkpoints wrap the model
        tree = tree["model"]
    if not isinstance(tree, Opaque) or "_modules" not in vars(tree):
        raise ValueError(
            f"{path}: does not contain a pickled torch module "
            "(a state_dict alone has no architecture)"
        )
    return tree
