"""The server's Prometheus metrics, in a registry of its own (several servers can share a process).

Names follow vLLM's where the concept is the same, with this project's prefix; tokens per second
is ``rate(loraretriever_generation_tokens_total[1m])``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loraretriever.serving.runner import Result

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """What ``GET /metrics`` exposes.

    Args:
        queue_depth: Requests accepted but not decoding yet (read at each scrape).
        running: Requests in the running batch (read at each scrape).
    """

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("loraretriever_queue_depth", "Requests waiting to be admitted.", registry=r).set_function(queue_depth)
        Gauge("loraretriever_running_batch_size", "Requests decoding in the running batch.", registry=r).set_function(
            running
        )
        self.ttft = Histogram(
            "loraretriever_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraretriever_time_per_output_token_seconds",
            "Mean time between a request's generated tokens.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraretriever_request_latency_seconds",
            "From arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Counter(
            "loraretriever_generation_tokens", "Tokens generated (rate() is tokens/s).", registry=r
        )
        self.prompt_tokens = Counter(
            "loraretriever_prompt_tokens",
            "Prompt tokens of the requests served (computed or from the prefix cache).",
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "loraretriever_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (as vLLM's prefix_cache_queries).",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "loraretriever_prefix_cache_hits",
            "Prompt tokens whose KV came from the prefix cache, prefill saved (hit rate: hits / queries).",
            registry=r,
        )
        self.adapter_requests = Counter(
            "loraretriever_adapter_requests",
            "Requests routed to each adapter ('base' for none).",
            ["adapter"],
            registry=r,
        )
        self.responses = Counter(
            "loraretriever_http_responses", "Responses by endpoint and status code.", ["endpoint", "status"], registry=r
        )

    def observe(self, result: Result) -> None:
        """Records one finished request."""
        t = result.timings
        self.ttft.observe(t.queue_s + t.first_token_s)
        self.e2e.observe(t.queue_s + t.generate_s)
        if result.completion_tokens > 1:
            self.itl.observe((t.generate_s - t.first_token_s) / (result.completion_tokens - 1))
        self.generation_tokens.inc(result.completion_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.prefix_cache_queries.inc(result.prompt_tokens)
        self.prefix_cache_hits.inc(result.cached_tokens)
        for adapter in result.routing.adapters or ("base",):
            self.adapter_requests.labels(adapter=adapter).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
