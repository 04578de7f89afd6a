"""The soak engine lives in ``bench/soak.py`` (a script users run); tests load it from there
so that the CI soak and the benchmark are the same code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def load_soak():
    """``bench/soak.py`` as a module (imported once)."""
    if "crossfield_soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("crossfield_soak", _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["crossfield_soak"] = module
        spec.loader.exec_module(module)
    return sys.modules["crossfield_soak"]
