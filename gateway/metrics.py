"""``GET /metrics`` in Prometheus text format, from a registry owned by the app (no module globals).

Request counters and latency come from the access middleware, generation numbers (TTFT, tokens) from
the engine's reports, and pool/scheduler state is read at scrape time by a collector, so the numbers
are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from engines.engine import Engine, GenerationReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Pool and scheduler state, read when Prometheus scrapes."""

    def __init__(self, engine_ref: Any) -> None:
        self._engine_ref = engine_ref

    def collect(self) -> Iterator[Any]:
        engine: Engine | None = self._engine_ref()
        if engine is None:
            return
        stats = engine.pool.stats
        for name, values, help_text in (
            ("peft_gateway_model_loads", stats.loads, "Models (bases and merged variants) loaded."),
            ("peft_gateway_model_load_seconds", stats.load_seconds, "Seconds spent loading models."),
            ("peft_gateway_cache_hits", stats.hits, "Requests served by an already loaded model."),
            ("peft_gateway_cache_misses", stats.misses, "Requests that had to load a model."),
            ("peft_gateway_cache_evictions", stats.evictions, "Models evicted to stay within the budget."),
        ):
            family = CounterMetricFamily(name, help_text, labels=["model"])
            for model, value in sorted(values.items()):
                family.add_metric([model], float(value))
            yield family
        held = GaugeMetricFamily(
            "peft_gateway_model_bytes", "Bytes of weights held per loaded model.", labels=["model"]
        )
        for entry in engine.pool.entries():
            held.add_metric([entry.key], float(entry.loaded.nbytes))
        yield held
        yield GaugeMetricFamily(
            "peft_gateway_cache_bytes", "Bytes of weights held in total.", value=engine.pool.bytes_held
        )
        yield GaugeMetricFamily(
            "peft_gateway_models_loaded", "Loaded bases and variants.", value=len(engine.pool.entries())
        )
        scheduler = engine.scheduler
        yield GaugeMetricFamily(
            "peft_gateway_queue_depth", "Requests waiting for a batch slot.", value=scheduler.queue_depth
        )
        yield GaugeMetricFamily(
            "peft_gateway_active_sequences", "Sequences prefilling or decoding.", value=scheduler.active_count
        )
        yield GaugeMetricFamily(
            "peft_gateway_batch_size", "Rows in the last decode step.", value=scheduler.stats.last_batch_size
        )
        yield CounterMetricFamily(
            "peft_gateway_decode_steps", "Batched decode steps run.", value=scheduler.stats.steps
        )
        yield CounterMetricFamily(
            "peft_gateway_prefill_tokens", "Prompt tokens prefilled.", value=scheduler.stats.prefill_tokens
        )


class GatewayMetrics:
    """The app's metrics; one instance per app, on ``app.state.metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "peft_gateway_requests", "HTTP requests.", ["path", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "peft_gateway_request_seconds",
            "HTTP request latency.",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft_seconds = Histogram(
            "peft_gateway_time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "peft_gateway_tokens", "Tokens processed.", ["model", "kind"], registry=self.registry
        )
        self.tokens_per_second = Histogram(
            "peft_gateway_generation_tokens_per_second",
            "Completion tokens per second of each request (after its first token).",
            ["model"],
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=self.registry,
        )
        self.finished = Counter(
            "peft_gateway_generations",
            "Finished generations by reason.",
            ["model", "reason"],
            registry=self.registry,
        )
        self._engine: Engine | None = None
        self.registry.register(_EngineCollector(lambda: self._engine))
        # Token counts per request id until the access log line is written (popped there).
        self._usage: dict[str, tuple[str, int, int]] = {}

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.reporters.append(self.record_generation)

    def record_request(self, path: str, status: int, seconds: float) -> None:
        known = (
            path
            if path
            in {
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/models",
                "/health",
                "/metrics",
                "/v1/load_model",
                "/v1/unload_model",
                "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter",
            }
            else "other"
        )
        self.requests.labels(known, str(status)).inc()
        self.request_seconds.labels(known).observe(seconds)

    def record_generation(self, report: GenerationReport) -> None:
        if report.request_id:
            _model, prompt, completion = self._usage.get(report.request_id, (report.model, 0, 0))
            self._usage[report.request_id] = (
                report.model,
                max(prompt, report.prompt_tokens),
                completion + report.completion_tokens,
            )
        self.tokens.labels(report.model, "prompt").inc(report.prompt_tokens)
        self.tokens.labels(report.model, "completion").inc(report.completion_tokens)
        self.finished.labels(report.model, report.finish_reason or "cancelled").inc()
        if report.time_to_first_token is not None:
            self.ttft_seconds.labels(report.model).observe(report.time_to_first_token)
            decode_seconds = report.seconds - report.time_to_first_token
            if report.completion_tokens > 1 and decode_seconds > 0:
                self.tokens_per_second.labels(report.model).observe(
                    (report.completion_tokens - 1) / decode_seconds
                )

    def pop_usage(self, request_id: str) -> tuple[str, int, int] | None:
        """(model, prompt tokens, completion tokens) of a finished request, for its access log line."""
        return self._usage.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
