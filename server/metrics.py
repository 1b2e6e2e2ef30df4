"""Prometheus metrics of the service (``--metrics-port``): per-RPC counts and latencies, cache events,
stored tasks, merged batches."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """One registry per server (tests run several servers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fewshot_requests", "RPCs by name, method and status code", ["rpc", "method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "fewshot_request_seconds", "RPC latency", ["rpc", "method"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.model_requests = Counter(
            "fewshot_model_requests",
            "Adapt, Classify and UpdateTask calls by model version and status code (a canary against its default)",
            ["rpc", "model", "version", "code"],
            registry=self.registry,
        )
        self.model_latency = Histogram(
            "fewshot_model_request_seconds",
            "Adapt, Classify and UpdateTask latency by model version",
            ["rpc", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.migration = Gauge(
            "fewshot_migration_tasks",
            "Tasks of the last migration of each model (MigrateTasks), by state: done, left, failed",
            ["model", "version", "state"],
            registry=self.registry,
        )
        self.cache = Counter("fewshot_task_cache_events", "Task cache hits, misses and evictions", ["event"], registry=self.registry)
        self.tasks = Gauge("fewshot_tasks_stored", "Live tasks in the persistent store", registry=self.registry)
        self.running = Gauge("fewshot_admission_running", "Heavy calls (Adapt, Classify) running now", registry=self.registry)
        self.queue_depth = Gauge("fewshot_admission_queue_depth", "Heavy calls waiting for an admission slot", registry=self.registry)
        self.queue_wait = Histogram(
            "fewshot_queue_seconds",
            "Time a call's work waited before it ran, by queue: admission (for a running slot), worker (for a worker thread)",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stopped = Counter(
            "fewshot_abandoned_work", "Work of cancelled or expired calls stopped, by stage", ["stage"], registry=self.registry
        )
        self.cache_bytes = Gauge(
            "fewshot_task_cache_bytes", "Bytes the task cache is charged (tensors + per-entry overhead)", registry=self.registry
        )
        self.body_bytes = Gauge(
            "fewshot_request_body_bytes",
            "Bytes of request bodies held by calls in flight (--max-inflight-body-mb bounds it)",
            registry=self.registry,
        )
        self._admission_wait, self._worker_wait = self.queue_wait.labels("admission"), self.queue_wait.labels("worker")
        self._call_children: dict[tuple[str, ...], tuple] = {}
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self.batch_images = Histogram(
            "fewshot_batch_images",
            "Images per backbone or network call (merged Classify requests)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.adapt_batch_tasks = Histogram(
            "fewshot_adapt_batch_tasks",
            "Tasks per inner-loop call (stacked concurrent Adapts)",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )

    def call_ended(self, rpc: str, method: str, code: str, seconds: float, model: str = "", version: str = "") -> None:
        """Count one ended call and its latency (``model``/``version``: the model version it ran on, where it ran on
        one). The labelled children are looked up once per label set and kept (a handful of RPCs, methods, codes
        and served versions): ``labels()`` takes a lock and builds a key on every call, on the event loop."""
        key = (rpc, method, code, model, version)
        children = self._call_children.get(key)
        if children is None:
            children = (self.requests.labels(rpc, method, code), self.latency.labels(rpc, method))
            if version:
                children += (self.model_requests.labels(rpc, model, version, code), self.model_latency.labels(rpc, model, version))
            self._call_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if version:
            children[2].inc()
            children[3].observe(seconds)

    def count_tasks_with(self, count: Callable[[], int]) -> None:
        self.tasks.set_function(count)

    def admission_waited(self, seconds: float) -> None:
        self._admission_wait.observe(seconds)

    def worker_waited(self, seconds: float) -> None:
        self._worker_wait.observe(seconds)

    def admission_changed(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.queue_depth.set(waiting)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
