"""Build a model from a checkpoint's config only as large as its weights say it is.

A checkpoint's config decides how much memory building its model takes, and a config is
just JSON: a 10 KB file can ask for a network of gigabytes, which used to be allocated
(3.5 GB) before loading its weights found that they do not fit. Building under
``allocation_budget`` counts what torch's tensor factories are asked for and refuses the
first request that would exceed the budget, before it is allocated. The budget follows
from the file's own weights (``weights_budget``): building asks for its weights about
1.5 times over (initial values, then copies), plus constants that do not grow with its
width (coupling tensors, activation normalisation samples: 25-60 MB for the presets);
the budget allows three times the weights and 256 MiB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

CONSTANTS_ALLOWANCE = 256 * 1024 * 1024  # bytes beyond three times the weights
_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}


def weights_budget(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes that building the model of these weights in ``dtype`` may ask for."""
    weights = sum(
        t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        for t in state_dict.values()
    )
    return 3 * weights + CONSTANTS_ALLOWANCE


class _Budget(TorchFunctionMode):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.requested = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES:
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.requested += _numel(func, args, kwargs) * dtype.itemsize
            if self.requested > self.limit:
                raise MemoryError(
                    f"building it asks for more than {self.limit / 2**20:.0f} MiB "
                    f"(at least {self.requested / 2**20:.0f} MiB)"
                )
        return func(*args, **kwargs)


def _numel(func, args: tuple, kwargs: dict) -> int:
    """Elements a factory call asks for: sizes as varargs, one sequence, or ``size=``."""
    if "size" in kwargs:
        size = kwargs["size"]
    else:
        size = args[0] if func is torch.full or len(args) == 1 else args
    if isinstance(size, int):
        return size
    return math.prod(int(s) for s in size)


@contextmanager
def allocation_budget(limit: int) -> Iterator[None]:
    """Within this, torch's tensor factories may be asked for ``limit`` bytes in all;
    the request beyond raises ``MemoryError`` before anything is allocated for it."""
    with _Budget(limit):
        yield
