"""A model that kills the process evaluating it: for the model-process tests.

It lives in a module of its own because the model process unpickles it, and so must
import its class by name (the child sees the parent's ``sys.path``)."""

from __future__ import annotations

import os

from crossfield.model import CrossfieldMACE


class CrashingMACE(CrossfieldMACE):
    """Ends its process at once (no exception, no cleanup, as a segfault in a kernel
    would) when a batch holds element ``crash_number``."""

    crash_number = 14

    def forward(self, graph, *args, **kwargs):
        element = self.config.elements.index(self.crash_number)
        if bool((graph.node_elements == element).any()):
            os._exit(70)
        return super().forward(graph, *args, **kwargs)


def crashing(model: CrossfieldMACE) -> CrossfieldMACE:
    """``model`` made a CrashingMACE (the same weights and config)."""
    model.__class__ = CrashingMACE
    return model
