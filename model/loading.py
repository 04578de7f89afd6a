"""Open any model file a user brings: a Crossfield checkpoint or a mace-torch ``.model``.

mace-torch users should not need a separate ``import-mace`` step to serve or evaluate
the file they have, so every place that opens a model file (``serve --checkpoint``,
a repository version, ``compute --checkpoint``) goes through here. A ``.model`` file is
read by the same safe reader as ``import-mace`` (no code from the file runs) and
converted in memory; the file on disk is never changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .mace import CrossfieldMACE

MACE_SUFFIX = ".model"


def is_mace_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix == MACE_SUFFIX


def load_model_file(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> CrossfieldMACE:
    """The model in ``path``: converted from mace-torch when it ends in ``.model``.

    ``dtype`` None keeps the file's precision (mace-torch files are often float32 or
    float64; a Crossfield checkpoint records its own).
    """
    if not is_mace_file(path):
        return load_checkpoint(path, map_location=map_location, dtype=dtype)
    from .mace_file import read_mace_file
    from .mace_import import convert_mace, mace_state_dict

    tree = read_mace_file(path)
    if dtype is None:
        source = next(iter(mace_state_dict(tree).values())).dtype
        dtype = source if source.is_floating_point else torch.float64
    model = convert_mace(tree, dtype=dtype)
    model.metadata = {"source": Path(path).name, "converted_from": "mace-torch"}
    return model.to(map_location).eval()
