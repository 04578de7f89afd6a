"""GPU tests (``@pytest.mark.gpu``) skip cleanly, with one reason, where CUDA is missing.

They run on a machine with one CUDA GPU through ``bench/gpu_suite.sh`` (``pytest -m gpu``);
everywhere else they are collected and reported as skipped, never failed.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    try:
        import torch

        available = torch.cuda.is_available()
    except ImportError:  # a client-only install
        available = False
    if available:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: bench/gpu_suite.sh runs it on one")
    for item in gpu_tests:
        item.add_marker(skip)
