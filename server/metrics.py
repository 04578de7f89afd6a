"""Every Prometheus metric of the server, defined in one place.

Each server owns its own ``CollectorRegistry`` (several servers can live in one process,
as in the tests) and exposes it over HTTP on its own port, apart from gRPC, so that
scraping never competes with inference traffic for the gRPC event loop.

Request and latency metrics carry the model *version*, so that a canary version can be
compared with the one it may replace (and a rollback justified) on the same replica.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latencies from sub-millisecond (a water molecule on a GPU) to tens of seconds (a queue
# backed up behind large crystals).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
STRUCTURE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ATOM_BUCKETS = (8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)


class Metrics:
    """The metric families; label values are model names, versions, heads and status code
    names ("-" for a model, version or head that did not resolve)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "crossfield_requests",
            "Structures answered, by final status; a streamed answer counts once written to "
            "its stream, one never delivered counts with the status its stream ended with",
            ["model", "version", "head", "status"],
            registry=r,
        )
        self.model_process_restarts = Counter(
            "crossfield_model_process_restarts",
            "Model processes started again after one died (--model-process)",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "crossfield_queue_seconds",
            "Time a structure waited in its model's queue",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "crossfield_compute_seconds",
            "Time to evaluate one batch (graph to results)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "crossfield_request_seconds",
            "Time from receiving a structure to its answer",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_structures = Histogram(
            "crossfield_batch_structures",
            "Structures per evaluated batch",
            ["model"],
            buckets=STRUCTURE_BUCKETS,
            registry=r,
        )
        self.batch_atoms = Histogram(
            "crossfield_batch_atoms",
            "Atoms per evaluated batch",
            ["model"],
            buckets=ATOM_BUCKETS,
            registry=r,
        )
        self.atoms = Counter(
            "crossfield_atoms_evaluated",
            "Atoms evaluated (rate() gives atoms/s)",
            ["model", "head"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "crossfield_queue_depth",
            "Structures waiting in a model version's queue",
            ["model", "version"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "crossfield_model_loaded",
            "1 for every loaded model version",
            ["model", "version", "dtype", "device"],
            registry=r,
        )
        self.model_compile_seconds = Gauge(
            "crossfield_model_compile_seconds",
            "Seconds a loaded version spent compiling for its backend and checking it "
            "against eager, before it served",
            ["model", "version", "backend"],
            registry=r,
        )
        self.model_loads = Counter(
            "crossfield_model_loads",
            "Model versions loaded, warmed and switched in",
            ["model"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "crossfield_model_load_failures",
            "Model versions refused: unreadable, partial, incompatible or failing warm-up",
            ["model"],
            registry=r,
        )
        self.rejected_calls = Counter(
            "crossfield_rejected_calls",
            "Calls refused before reaching a service: bad token or per-client limit",
            ["status"],
            registry=r,
        )
        self.open_streams = Gauge(
            "crossfield_open_streams",
            "ComputeStream, ComputeSession and Relax calls open now",
            registry=r,
        )
        self.stream_held_bytes = Gauge(
            "crossfield_stream_held_bytes",
            "Estimated bytes of structures that open streams have admitted and not yet "
            "delivered (each stream holds at most --stream-window-bytes)",
            registry=r,
        )
        self.streams_ended = Counter(
            "crossfield_streams_ended",
            "ComputeStream, ComputeSession and Relax calls ended, by reason: completed, cancelled, "
            "deadline, idle (the "
            "client sent nothing), unread (the client read nothing), stopping (the server)",
            ["reason"],
            registry=r,
        )
        self.session_graphs = Counter(
            "crossfield_session_graphs",
            "Graphs of MD session steps: the session's neighbour list reused (masked to the "
            "cutoff) or rebuilt (an atom moved more than half the skin, or the cell changed)",
            ["outcome"],
            registry=r,
        )
        self.device_memory = Gauge(
            "crossfield_device_memory_bytes",
            "Accelerator memory after the last batch: allocated by tensors, and reserved by "
            "the caching allocator (what the process holds); CUDA devices only",
            ["device", "kind"],
            registry=r,
        )

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Start the exposition endpoint; returns the HTTP server (``server_port``,
        ``shutdown()``). Port 0 picks a free port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
