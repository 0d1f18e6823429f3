"""Prometheus metrics of one app, kept in the app's own registry so that apps never share counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    """Request counts and latency by route, batch sizes, queue depth, model readiness."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nmt_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nmt_http_request_duration_seconds",
            "Time from request start to the last byte of the response, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "nmt_batch_size_texts",
            "Texts translated together in one model call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "nmt_batch_padded_tokens",
            "Work of one model call: longest source in subwords x texts x beams.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "nmt_batch_duration_seconds",
            "Time the model took for one batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "nmt_queue_depth_texts",
            "Texts waiting for the model worker.",
            registry=self.registry,
        )
        self.texts = Counter(
            "nmt_translated_texts",
            "Texts translated (streamed texts included).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "nmt_rejected_requests",
            "Requests turned away before translation, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "nmt_worker_restarts",
            "Times the model worker's serving loop died and was started again.",
            registry=self.registry,
        )
        self.cancelled_batches = Counter(
            "nmt_cancelled_batches",
            "Batches stopped between decoding steps because nobody waited for them any more.",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "nmt_cache_hits",
            "Sentences answered from the translation cache.",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "nmt_cache_misses",
            "Sentences looked up in the translation cache and not found (then translated).",
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "nmt_cache_entries",
            "Sentences held in the translation cache.",
            registry=self.registry,
        )
        self.reloads = Counter(
            "nmt_model_reloads",
            "Model reloads by outcome (ok, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "nmt_model_ready",
            "1 once the model is loaded and the worker accepts requests.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
