"""The Prometheus metrics of ``Relax``, on the server's own registry (``Metrics.registry``).

``rate(crossfield_relax_steps_total[1m])`` gives relaxation steps (force evaluations) per
second; ``crossfield_relaxations_finished_total`` by outcome gives the share that converged.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 500, 1000, 5000)


class RelaxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "crossfield_relaxations_in_flight",
            "Relaxations in the batch being stepped (bounded by one batch's atom and edge "
            "budget per model)",
            registry=registry,
        )
        self.queued = Gauge(
            "crossfield_relaxations_queued",
            "Relaxations waiting for a place in flight",
            registry=registry,
        )
        self.steps = Counter(
            "crossfield_relax_steps",
            "Force evaluations of relaxations (rate() gives steps/s)",
            ["model"],
            registry=registry,
        )
        self.finished = Counter(
            "crossfield_relaxations_finished",
            "Relaxations answered, by outcome: converged, unconverged (out of steps), or the "
            "status code that ended them (CANCELLED, DEADLINE_EXCEEDED, INVALID_ARGUMENT, ...)",
            ["model", "outcome"],
            registry=registry,
        )
        self.steps_per_relaxation = Histogram(
            "crossfield_relax_steps_per_relaxation",
            "Optimiser steps a relaxation took to converge or run out",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.graphs = Counter(
            "crossfield_relax_graphs",
            "Graphs of relaxation steps: the structure's neighbour list reused (masked to "
            "the cutoff) or rebuilt (an atom moved more than half the skin, or the cell "
            "changed: every step of a cell relaxation)",
            ["outcome"],
            registry=registry,
        )
