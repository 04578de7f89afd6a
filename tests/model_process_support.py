"""Models that act on where they run, for the model-process and session tests: one that
kills the process evaluating it, one that notes which thread evaluates it.

They live in a module of their own because the model process unpickles them, and so must
import their classes by name (the child sees the parent's ``sys.path``)."""

from __future__ import annotations

import os
import threading

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


class ThreadNamingMACE(CrossfieldMACE):
    """Notes the name of the thread that evaluates each batch in ``seen`` (one list for
    all instances of this process)."""

    seen: list[str] = []

    def forward(self, graph, *args, **kwargs):
        ThreadNamingMACE.seen.append(threading.current_thread().name)
        return super().forward(graph, *args, **kwargs)


def thread_naming(model: CrossfieldMACE) -> CrossfieldMACE:
    """``model`` made a ThreadNamingMACE (the same weights and config)."""
    model.__class__ = ThreadNamingMACE
    return model
