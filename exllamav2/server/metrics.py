"""The server's Prometheus metrics (`GET /metrics`, text format), through `prometheus_client` (the `server` extra).

Counted as requests go: requests by route and status, prompt and generated tokens, time to first token and
time per output token (histograms). Read from the generator at each scrape: queue depth, running jobs, KV cache
pages in use and free, prefix-cache hits (prompt tokens taken from cached pages), preemptions."""

from __future__ import annotations

NAMESPACE = "exllamav2"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServerMetrics:
    """One registry per app, so several servers in one process keep their own counts."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        ns = NAMESPACE
        self.requests = Counter("requests", "HTTP requests by route and status code", ["route", "status"],
                                namespace=ns, registry=self.registry)
        self.prompt_tokens = Counter("prompt_tokens", "prompt tokens of accepted requests", namespace=ns,
                                     registry=self.registry)
        self.generation_tokens = Counter("generation_tokens", "tokens generated", namespace=ns,
                                         registry=self.registry)
        self.ttft = Histogram("time_to_first_token_seconds", "from the request's arrival to its first token",
                              namespace=ns, registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tpot = Histogram("time_per_output_token_seconds", "mean time between a job's tokens after its first",
                              namespace=ns, registry=self.registry,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.registry.register(_EngineCollector(engine))

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and counters read from the generator when scraped (the generator thread owns them; reading ints
    and list lengths is safe)."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ns = NAMESPACE
        gen_async = self.engine.generator
        gen = gen_async.generator
        pt = gen.page_table
        free = pt.num_free_pages()
        yield GaugeMetricFamily(f"{ns}_queue_depth", "jobs waiting for a slot (including preempted ones)",
                                value=gen_async.num_pending_jobs())
        yield GaugeMetricFamily(f"{ns}_running_jobs", "jobs in the running batch", value=gen.num_active_jobs())
        yield GaugeMetricFamily(f"{ns}_kv_pages_used", "KV cache pages held by jobs", value=pt.num_pages - free)
        yield GaugeMetricFamily(f"{ns}_kv_pages_free", "KV cache pages no job holds", value=free)
        yield GaugeMetricFamily(f"{ns}_kv_pages_total", "KV cache pages", value=pt.num_pages)
        yield GaugeMetricFamily(f"{ns}_kv_page_size_tokens", "tokens per KV cache page", value=pt.page_size)
        yield CounterMetricFamily(f"{ns}_prefix_cache_hit_tokens", "prompt tokens taken from cached pages",
                                  value=gen.num_cached_tokens)
        yield CounterMetricFamily(f"{ns}_prefill_tokens", "prompt tokens run through the model",
                                  value=gen.num_prefilled_tokens)
        yield CounterMetricFamily(f"{ns}_preemptions", "jobs preempted when the KV cache ran out of pages",
                                  value=gen.num_preemptions)
