"""``GET /metrics`` in Prometheus text format, from a registry owned by the app (no module globals).

Request counters and latency come from the access middleware, generation numbers (TTFT, tokens) from
the engine's reports, and pool/scheduler state is read at scrape time by a collector, so the numbers
are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from engines.catalog import Catalog
from engines.engine import Engine, GenerationReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

#: The ``model`` label of everything that is not a configured name or a model that loaded.
OTHER = "other"
#: At most this many model label values are learned from loaded models; later ones count as "other".
MAX_MODEL_LABELS = 256


class ModelNames(Protocol):
    """Where model labels come from: the in-process ``Engine``, or the Ray ingress's ``ClusterEngine``."""

    @property
    def catalog(self) -> Catalog: ...

    def loaded_model_names(self) -> list[tuple[str, str]]: ...


class ModelLabels:
    """Bounded ``model`` label values: clients choose model names, so they must not choose series.

    A label is a configured base or ``base+alias``, or the public name of a model that loaded (learned
    from the pool, at most :data:`MAX_MODEL_LABELS`). Pool keys map to those public names, so a local
    adapter's server folder (part of its pool key) never becomes a label either. Anything else, such as
    a thousand invented ``tiny+org/nonexistent-N`` that each missed the cache once, is ``"other"``.
    """

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self.limit = limit
        self._learned: dict[str, str] = {}  # pool key or model id -> label

    def learn(self, source: ModelNames) -> None:
        for alias, name in source.loaded_model_names():
            if alias not in self._learned and len(self._learned) < self.limit:
                self._learned[alias] = name

    def label(self, source: ModelNames, name: str) -> str:
        learned = self._learned.get(name)
        if learned is not None:
            return learned
        catalog = source.catalog
        if any(name == base.name for base in catalog.bases):
            return name
        if any(name == f"{adapter.base}+{adapter.alias}" for adapter in catalog.adapters):
            return name
        return OTHER


class _EngineCollector(Collector):
    """Pool and scheduler state, read when Prometheus scrapes."""

    def __init__(self, engine_ref: Any, labels: ModelLabels) -> None:
        self._engine_ref = engine_ref
        self._labels = labels

    def collect(self) -> Iterator[Any]:
        engine: Engine | None = self._engine_ref()
        if engine is None:
            return
        stats = engine.pool.stats
        self._labels.learn(engine)
        for name, values, help_text in (
            ("peft_gateway_model_loads", stats.loads, "Models (bases and merged variants) loaded."),
            ("peft_gateway_model_load_seconds", stats.load_seconds, "Seconds spent loading models."),
            ("peft_gateway_cache_hits", stats.hits, "Requests served by an already loaded model."),
            ("peft_gateway_cache_misses", stats.misses, "Requests that had to load a model."),
            ("peft_gateway_cache_evictions", stats.evictions, "Models evicted to stay within the budget."),
        ):
            family = CounterMetricFamily(name, help_text, labels=["model"])
            for model, value in sorted(self._by_label(engine, dict(values)).items()):
                family.add_metric([model], float(value))
            yield family
        held = GaugeMetricFamily(
            "peft_gateway_model_bytes", "Bytes of weights held per loaded model.", labels=["model"]
        )
        nbytes: dict[str, float] = {entry.key: entry.loaded.nbytes for entry in engine.pool.entries()}
        for model, value in sorted(self._by_label(engine, nbytes).items()):
            held.add_metric([model], float(value))
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

    def _by_label(self, engine: Engine, values: dict[str, float]) -> dict[str, float]:
        """``values`` keyed by pool key, summed per bounded label."""
        summed: dict[str, float] = {}
        for key, value in values.items():
            label = self._labels.label(engine, key)
            summed[label] = summed.get(label, 0) + value
        return summed


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
        self._names: ModelNames | None = None
        self.labels = ModelLabels()
        self.registry.register(_EngineCollector(lambda: self._engine, self.labels))
        # Token counts per request id until the access log line is written (popped there).
        self._usage: dict[str, tuple[str, int, int]] = {}

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        self.label_models_from(engine)
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
        model = self._model_label(report.model)
        self.tokens.labels(model, "prompt").inc(report.prompt_tokens)
        self.tokens.labels(model, "completion").inc(report.completion_tokens)
        self.finished.labels(model, report.finish_reason or "cancelled").inc()
        if report.time_to_first_token is not None:
            self.ttft_seconds.labels(model).observe(report.time_to_first_token)
            decode_seconds = report.seconds - report.time_to_first_token
            if report.completion_tokens > 1 and decode_seconds > 0:
                self.tokens_per_second.labels(model).observe((report.completion_tokens - 1) / decode_seconds)

    def label_models_from(self, source: ModelNames) -> None:
        """Label generations by ``source``'s models where no local engine is attached (the Ray ingress)."""
        self._names = source

    def _model_label(self, model: str) -> str:
        if self._names is None:
            return OTHER
        self.labels.learn(self._names)
        return self.labels.label(self._names, model)

    def pop_usage(self, request_id: str) -> tuple[str, int, int] | None:
        """(model, prompt tokens, completion tokens) of a finished request, for its access log line."""
        return self._usage.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
