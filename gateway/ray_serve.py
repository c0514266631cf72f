"""Serving on a Ray cluster: the same Starlette app as Serve's HTTP ingress, engines as replicas.

The seam is ``create_app``'s engine factory: in the ingress, ``app.state.engine`` is a
:class:`ClusterEngine`, an engine-like client whose ``acquire``/``chat_request``/``text_request``/
``generate`` have the in-process engine's signatures, so the routes, their validation and their SSE
framing are exactly those of single-process serving. Prompts are rendered and tokenized here, with the
model's own tokenizer (fetched once from a replica); each choice is one streaming handle call with
``multiplexed_model_id`` = the canonical model name, which Serve routes to a replica that already serves
that name. Replica state for ``/v1/models`` and ``/metrics`` comes from the replicas' snapshots
(``engines.ray_replica.ReplicaDirectory``). Ray is imported only here and only when used.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engines.catalog import Catalog
from engines.engine import Admitted, Engine, GenerationReport, ModelInfo
from engines.errors import EngineError
from engines.generation import ChatMessage, GenerationEvent, GenerationRequest
from engines.grammar import CompiledGrammar, Constraint, GrammarCache
from engines.pool import Lease
from engines.ray_replica import (
    DIRECTORY_NAME,
    ModelFacts,
    NotInCluster,
    ReplicaDirectory,
    ReplicaFailed,
    ReplicaSnapshot,
    ReplicaUnavailable,
    replica_class,
    routing_key,
)
from engines.vocabulary import CountsVocabulary
from gateway.metrics import GatewayMetrics
from gateway.ray_loopback import HOOK as LOOPBACK_HOOK
from gateway.settings import Settings

log = logging.getLogger("peft_gateway.ray")

APP_NAME = "peft-gateway"
REPLICA_HEADER = "x-peft-gateway-replica"
#: Environment for a private local Ray instance: every listener on 127.0.0.1, no token file written
#: into ~/.ray (it would change later runs), no usage reporting.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
#: How long Serve's router waits to learn which replica took a new model name before it falls back to
#: "the replica with the fewest models" (Serve's default, 1 s, is shorter than its own update latency
#: on a busy host, and a miss there loads the adapter on a second replica). Set in the ingress.
ROUTER_ENV = {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "3"}
#: A request whose replica died before it produced anything is sent again, this many times at most.
RETRIES = 3
RETRY_PAUSE_SECONDS = 0.5
SNAPSHOT_POLL_SECONDS = 1.0
FACTS_CACHE_SIZE = 4096
TOKENIZER_CACHE_SIZE = 64


# --------------------------------------------------------------------------- the replica header


@dataclass
class ReplicaNote:
    """Which replica served the current request; filled by ``ClusterEngine.generate``."""

    name: str | None = None
    #: The replica that answered ``acquire``: named when no stream ran (``/v1/load_model``).
    described: str | None = None
    flush: Callable[[], Awaitable[None]] | None = None

    async def record(self, name: str) -> None:
        if self.name is None:
            self.name = name
            if self.flush is not None:
                await self.flush()


CURRENT_REPLICA: contextvars.ContextVar[ReplicaNote | None] = contextvars.ContextVar(
    "peft_gateway_replica", default=None
)


class ReplicaHeader:
    """Adds ``x-peft-gateway-replica`` to every response a replica served.

    A streamed response's headers go out before generation starts, so they are held back (with the
    first frames) until the replica's first message names it, which comes before any token; responses
    no replica served (errors found in the ingress, ``/v1/models``) go out unchanged when complete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = ReplicaNote()
        held: list[Message] = []

        async def flush() -> None:
            while held:
                message = held.pop(0)
                replica = note.name or note.described
                if message["type"] == "http.response.start" and replica is not None:
                    headers = list(message.get("headers", []))
                    headers.append((REPLICA_HEADER.encode(), replica.encode("latin-1", "replace")))
                    message = {**message, "headers": headers}
                await send(message)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" or held:
                held.append(message)
                finished = message["type"] == "http.response.body" and not message.get("more_body", False)
                if note.name is not None or finished:
                    await flush()
                return
            await send(message)

        note.flush = flush
        token = CURRENT_REPLICA.set(note)
        try:
            await self.app(scope, receive, send_with_header)
        finally:
            CURRENT_REPLICA.reset(token)


# --------------------------------------------------------------------------- the engine-like client


@dataclass
class RemoteLoaded(CountsVocabulary):
    """The parts of ``LoadedModel`` the routes read, for a model that lives on replicas."""

    name: str
    tokenizer: Any
    dtype: str
    device: str
    context_length: int
    sampling_defaults: dict[str, float]
    parent: str | None
    root: str | None
    load_seconds: float


class RemoteLease:
    """Stands for a pool lease; the real one is taken by the replica for each stream it runs."""

    def __init__(self, model_id: str, loaded: RemoteLoaded) -> None:
        self.model_id = model_id
        self.loaded = loaded

    def release(self) -> None:
        """Nothing is held here: each replica releases its own lease when its stream ends."""


@dataclass
class ClusterScheduler:
    """``/ready`` asks ``engine.scheduler.alive``: true once a replica has reported in."""

    engine: ClusterEngine

    @property
    def alive(self) -> bool:
        return bool(self.engine.snapshots)


@dataclass
class ClusterEngine:
    """``app.state.engine`` in the Ray ingress: forwards generation to the engine deployment."""

    settings: Settings
    handle: Any
    directory: Any
    reporters: list[Callable[[GenerationReport], None]] = field(default_factory=list)
    snapshots: list[ReplicaSnapshot] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._catalog = self.settings.catalog()
        self._engine_helpers = _PromptPreparation()
        self._grammars = GrammarCache()
        self._facts: OrderedDict[str, ModelFacts] = OrderedDict()
        self._tokenizers: OrderedDict[str, Any] = OrderedDict()
        self.created = int(time.time())
        self.scheduler = ClusterScheduler(self)
        self._poller: asyncio.Task[None] | None = None

    # -- lifetime

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a restarting directory: keep the last picture
                self.snapshots = list(await self.directory.snapshots.remote())
            await asyncio.sleep(SNAPSHOT_POLL_SECONDS)

    # -- what the admin routes touch: catalogs live in each replica, so changing them is refused

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @catalog.setter
    def catalog(self, value: Catalog) -> None:
        raise NotInCluster(
            "Adding adapter aliases at run time is not available when serving on Ray: each replica has "
            "its own catalog. Configure them in [adapters], or name adapters directly "
            "('<base>+<org/adapter>')."
        )

    @property
    def pool(self) -> Any:
        raise NotInCluster(
            "Unloading is not available when serving on Ray: each replica's pool evicts idle models "
            "under its own budget."
        )

    # -- the engine interface the routes use

    async def acquire(self, model: str) -> RemoteLease:
        """Resolve ``model`` on the replica that serves it (loading it there) and keep its facts."""
        key = routing_key(self._catalog, model)
        facts = self._facts.get(key)
        tokenizer = self._tokenizers.get(facts.tokenizer_key) if facts is not None else None
        if facts is None or tokenizer is None:
            facts, tokenizer = await self._describe(key)
        self._facts[key] = facts
        self._facts.move_to_end(key)
        while len(self._facts) > FACTS_CACHE_SIZE:
            self._facts.popitem(last=False)
        loaded = RemoteLoaded(
            name=facts.model_id,
            tokenizer=tokenizer,
            dtype=facts.dtype,
            device=facts.device,
            context_length=facts.context_length,
            sampling_defaults=facts.sampling_defaults,
            parent=facts.parent,
            root=facts.root,
            load_seconds=facts.load_seconds,
        )
        return RemoteLease(facts.model_id, loaded)

    async def _describe(self, key: str, *, resend_tokenizer: bool = False) -> tuple[ModelFacts, Any]:
        note = CURRENT_REPLICA.get()
        known = frozenset() if resend_tokenizer else frozenset(self._tokenizers)
        for attempt in range(RETRIES + 1):
            try:
                kind, payload = await self.handle.options(multiplexed_model_id=key).describe.remote(
                    key, known
                )
                break
            except Exception as exc:
                if attempt == RETRIES or not _replica_gone(exc):
                    raise _as_engine_error(exc) from exc
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
        if kind == "error":
            raise payload
        facts, tokenizer = payload
        if note is not None:
            note.described = facts.replica
        if tokenizer is None:
            tokenizer = self._tokenizers.get(facts.tokenizer_key)
            if tokenizer is None:  # dropped from the cache while the replica answered
                return await self._describe(key, resend_tokenizer=True)
        self._tokenizers[facts.tokenizer_key] = tokenizer
        self._tokenizers.move_to_end(facts.tokenizer_key)
        while len(self._tokenizers) > TOKENIZER_CACHE_SIZE:
            self._tokenizers.popitem(last=False)
        return facts, tokenizer

    def chat_request(
        self, lease: RemoteLease, messages: list[ChatMessage], **options: Any
    ) -> GenerationRequest:
        """Rendered and tokenized here exactly as the in-process engine does (same code)."""
        return self._engine_helpers.chat_request(cast(Lease, lease), messages, **options)

    def text_request(self, lease: RemoteLease, prompt: str | list[int], **options: Any) -> GenerationRequest:
        return self._engine_helpers.text_request(cast(Lease, lease), prompt, **options)

    async def compile_grammar(self, lease: RemoteLease, constraint: Constraint) -> CompiledGrammar:
        """Compiled here against the model's tokenizer, so a bad schema is a 400 before anything is sent;
        the replica compiles it again for itself (``CompiledGrammar`` travels as its constraint)."""
        tokenizer = lease.loaded.tokenizer
        eos = frozenset({tokenizer.eos_token_id}) if tokenizer.eos_token_id is not None else frozenset()
        compiled: CompiledGrammar = await asyncio.to_thread(
            self._grammars.compile, tokenizer, constraint, eos
        )
        return compiled

    def admit(self, lease: RemoteLease, request: GenerationRequest) -> Admitted:
        """The replica admits (Serve queues up to ``max_ongoing_requests``); events start on first read."""
        events = self.generate(lease, request)
        return Admitted(cast(Any, _ClosesStream(events)), events)

    async def generate(
        self, lease: RemoteLease, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Events from a replica; one that dies before producing anything is replaced transparently.

        Once events have reached the client, a dead replica ends the stream with a retryable 503
        (``ReplicaUnavailable``): the routes turn that into an error frame and ``[DONE]``.
        """
        note = CURRENT_REPLICA.get()
        started = time.perf_counter()
        first: float | None = None
        last: GenerationEvent | None = None
        try:
            for attempt in range(RETRIES + 1):
                stream = self.handle.options(
                    multiplexed_model_id=lease.model_id, stream=True
                ).generate.remote(lease.model_id, request)
                try:
                    async for kind, payload in stream:
                        if kind == "replica":
                            if note is not None:
                                await note.record(payload)
                            continue
                        if kind == "error":
                            raise payload
                        if kind == "named":  # the replica's name with its first event, one Ray item
                            name, payload = payload
                            if note is not None:
                                await note.record(name)
                        last = payload
                        if first is None and (payload.text or payload.done):
                            first = time.perf_counter() - started
                        yield payload
                        if payload.done:
                            return
                    failure: Exception = ReplicaUnavailable(
                        "The replica's stream ended before the answer did."
                    )
                except EngineError:
                    raise
                except Exception as exc:  # Ray's errors for a dead or unreachable replica, among others
                    if not _replica_gone(exc):
                        raise _as_engine_error(exc) from exc
                    failure = exc
                finally:
                    stream.cancel()
                if last is not None or attempt == RETRIES:
                    raise ReplicaUnavailable(
                        "The replica serving this request stopped; retry the request."
                    ) from failure
                log.warning("replica lost before the first event (%s); sending the request again", failure)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
        finally:
            report = GenerationReport.of(lease.model_id, request, last, first, started)
            for reporter in self.reporters:
                reporter(report)

    def loaded_model_names(self) -> list[tuple[str, str]]:
        """``(routing key or model id, model id)`` of every model a replica described to this ingress."""
        return [
            (alias, facts.model_id) for key, facts in self._facts.items() for alias in (key, facts.model_id)
        ]

    def models(self) -> list[ModelInfo]:
        """What any replica serves: configured names, plus every variant loaded anywhere."""
        rows: dict[str, ModelInfo] = {}
        for snapshot in self.snapshots:
            for info in snapshot.models:
                seen = rows.get(info.id)
                if seen is None or (info.loaded and not seen.loaded):
                    rows[info.id] = info
        if not rows:  # before the first replica reported: the configured names
            for base in self._catalog.bases:
                rows[base.name] = ModelInfo(
                    id=base.name,
                    created=self.created,
                    owned_by="peft-gateway",
                    root=base.source,
                    context_length=base.context_length,
                )
            for adapter in self._catalog.adapters:
                model_id = f"{adapter.base}+{adapter.alias}"
                rows[model_id] = ModelInfo(
                    id=model_id,
                    created=self.created,
                    owned_by="peft-gateway",
                    parent=adapter.base,
                    root=adapter.source,
                )
        return list(rows.values())


class _PromptPreparation(Engine):
    """``Engine``'s prompt preparation (chat template, tokenization, context checks) without its pool.

    Reusing the methods themselves, not a copy, is what keeps the prompts byte-identical to
    single-process serving. Only ``chat_request``/``text_request`` are used; they read nothing but
    ``lease.loaded.tokenizer`` and ``lease.loaded.context_length``.
    """

    def __init__(self) -> None:  # deliberately no pool, scheduler or worker thread
        pass


def _replica_gone(exc: BaseException) -> bool:
    """Errors that mean "the replica (or the route to it) is gone", after which a resend is safe."""
    from ray import exceptions
    from ray.serve import exceptions as serve_exceptions

    gone: tuple[type[BaseException], ...] = (
        exceptions.RayActorError,
        exceptions.ActorUnavailableError,
        serve_exceptions.BackPressureError,
        serve_exceptions.DeploymentUnavailableError,
        serve_exceptions.RequestCancelledError,
    )
    return isinstance(exc, gone) and not isinstance(exc, exceptions.RayTaskError)


def _as_engine_error(exc: BaseException) -> EngineError:
    if _replica_gone(exc):
        return ReplicaUnavailable("No engine replica could take the request; retry it.")
    return ReplicaFailed(f"The engine replica failed: {type(exc).__name__}")


# --------------------------------------------------------------------------- per-replica metrics


class ReplicaCollector(Collector):
    """Per-replica gauges and counters from the replicas' snapshots, labelled ``replica``.

    ``vllm:lora_requests_info`` follows vLLM's metric (value: the time of the snapshot; labels: the
    adapters with running and waiting requests, comma-separated, and ``max_lora``), which adapter-aware
    routers such as the Kubernetes Gateway API Inference Extension read.
    """

    def __init__(self, engine: ClusterEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        snapshots = self._engine.snapshots
        yield GaugeMetricFamily("peft_gateway_replicas", "Engine replicas reporting.", value=len(snapshots))
        gauges: dict[str, tuple[str, Callable[[ReplicaSnapshot], float]]] = {
            "peft_gateway_replica_models_loaded": ("Loaded bases and variants.", lambda s: len(s.loaded)),
            "peft_gateway_replica_cache_bytes": ("Bytes of weights held.", lambda s: s.cache_bytes),
            "peft_gateway_replica_queue_depth": ("Requests waiting for a slot.", lambda s: s.queue_depth),
            "peft_gateway_replica_active_sequences": ("Sequences running.", lambda s: s.active_sequences),
        }
        for name, (help_text, read) in gauges.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["replica"])
            for snapshot in snapshots:
                gauge.add_metric([snapshot.replica], float(read(snapshot)))
            yield gauge
        served = CounterMetricFamily("peft_gateway_replica_requests", "Streams started.", labels=["replica"])
        for snapshot in snapshots:
            served.add_metric([snapshot.replica], float(snapshot.requests))
        yield served
        for counter in ("loads", "hits", "misses", "evictions"):
            per_model = CounterMetricFamily(
                f"peft_gateway_replica_model_{counter}",
                f"Pool {counter} per model.",
                labels=["replica", "model"],
            )
            for snapshot in snapshots:
                for model, value in sorted(snapshot.counters.get(counter, {}).items()):
                    per_model.add_metric([snapshot.replica, model], float(value))
            yield per_model
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters per replica (vLLM-compatible).",
            labels=["replica", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        for snapshot in snapshots:
            info.add_metric(
                [
                    snapshot.replica,
                    ",".join(snapshot.running_adapters),
                    ",".join(snapshot.waiting_adapters),
                    str(snapshot.max_lora),
                ],
                snapshot.time,
            )
        yield info


def cluster_engine_factory(
    engine_handle: Any, directory_namespace: str
) -> Callable[[Settings, GatewayMetrics], Any]:
    """``create_app``'s engine factory for the ingress replica."""

    def factory(settings: Settings, metrics: GatewayMetrics) -> ClusterEngine:
        import ray

        directory = ray.get_actor(DIRECTORY_NAME, namespace=directory_namespace)
        engine = ClusterEngine(settings=settings, handle=engine_handle, directory=directory)
        engine.reporters.append(metrics.record_generation)
        metrics.label_models_from(engine)
        metrics.registry.register(ReplicaCollector(engine))
        engine.start()
        return engine

    return factory


# --------------------------------------------------------------------------- deployments


class GatewayIngress:
    """Serve's HTTP ingress: builds the ordinary gateway app with a ``ClusterEngine`` inside."""

    def __init__(self, settings: dict[str, Any], engine_handle: Any, directory_namespace: str) -> None:
        self._settings = Settings.model_validate(settings)
        self._factory = cluster_engine_factory(engine_handle, directory_namespace)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from gateway.app import create_app
        from gateway.logs import configure_logging

        configure_logging(self._settings.server.log_format, self._settings.server.log_level)
        app = create_app(self._settings, engine_factory=self._factory)
        app.add_middleware(ReplicaHeader)
        return app


def build_application(settings: Settings, directory_namespace: str) -> Any:
    """The Serve application: ingress -> engine deployment, shaped by ``[cluster]``."""
    from ray import serve

    from gateway.app import engine_limits

    cluster = settings.cluster
    limits = engine_limits(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cluster.cpus_per_replica, "num_gpus": cluster.gpus_per_replica},
        "health_check_period_s": cluster.health_check_period_s,
        "graceful_shutdown_timeout_s": 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        # Beyond a full batch and queue the engine answers 503 itself; Serve must not queue in front.
        "max_ongoing_requests": limits.max_batch + limits.max_waiting,
    }
    if cluster.min_replicas is not None and cluster.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas,
            "max_replicas": cluster.max_replicas,
            "target_ongoing_requests": limits.max_batch,
        }
    else:
        options["num_replicas"] = cluster.num_replicas
    engines = serve.deployment(name="EngineReplica", **options)(replica_class(cluster.max_models_per_replica))
    ingress = serve.deployment(
        name="Gateway",
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": ROUTER_ENV}},
        max_ongoing_requests=1000,
        health_check_period_s=cluster.health_check_period_s,
        graceful_shutdown_timeout_s=5.0,
        graceful_shutdown_wait_loop_s=0.5,
    )(serve.ingress()(GatewayIngress))
    return ingress.bind(
        settings.model_dump(mode="json"),
        engines.bind(settings.catalog(), limits, directory_namespace),
        directory_namespace,
    )


def start_directory(namespace: str, health_check_period_s: float) -> Any:
    """The snapshot directory actor; detached, so it outlives the deploying process's handle to it
    (``undeploy`` removes it with the application)."""
    import ray

    return (
        ray.remote(ReplicaDirectory)
        .options(
            name=DIRECTORY_NAME, namespace=namespace, get_if_exists=True, num_cpus=0, lifetime="detached"
        )
        .remote(stale_seconds=3 * health_check_period_s + 2)
    )


def undeploy(namespace: str = APP_NAME) -> None:
    """Remove the application and its directory actor (Serve itself and Ray are left running)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=namespace))


def deploy(settings: Settings, *, host: str, port: int, namespace: str = APP_NAME) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and deploy the app."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    directory = start_directory(namespace, settings.cluster.health_check_period_s)
    handle = serve.run(build_application(settings, namespace), name=APP_NAME, route_prefix="/")
    return handle, directory


def init_local_ray(
    temp_dir: str, *, num_cpus: float | None = None, object_store_bytes: int = 200 * 2**20
) -> None:
    """A private Ray instance on this machine, every listener on 127.0.0.1 (see ``LOOPBACK_ENV``)."""
    for key, value in {**LOOPBACK_ENV, **ROUTER_ENV}.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(
        address="local",
        num_cpus=int(num_cpus) if num_cpus is not None else None,
        include_dashboard=False,
        object_store_memory=object_store_bytes,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        namespace=APP_NAME,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK, "env_vars": local_import_path()},
    )


def local_import_path() -> dict[str, str]:
    """``PYTHONPATH`` for a private instance's workers: where this process imports the gateway from.

    Workers import ``gateway`` and ``engines`` by name (the setup hook, the deployments). Run from a
    source checkout (``python -m gateway.cli``) or through a stale editable install, the driver finds
    them on its own ``sys.path`` but the workers would not, and every worker would fail to start.
    """
    source = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(part for part in (source, existing) if part)}


def serve_on_ray(settings: Settings, address: str) -> int:
    """``peft-gateway serve --ray ADDRESS``: deploy, then wait for Ctrl-C or SIGTERM, then tear down.

    ``local`` starts a private Ray instance (torn down on exit); any other value joins that cluster
    (``auto``, ``ray://host:10001`` or ``host:6379``) and only removes this application on exit.
    """
    import ray
    from ray import serve

    local = address == "local"
    temp_dir = tempfile.mkdtemp(prefix="pgw-ray-", dir="/tmp") if local else None
    if temp_dir is not None:
        init_local_ray(temp_dir)
    else:
        ray.init(address=address, namespace=APP_NAME, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings, host=settings.server.host, port=settings.server.port)
        print(
            f"peft-gateway: serving {', '.join(settings.models)} through Ray Serve on "
            f"http://{settings.server.host}:{settings.server.port}",
            flush=True,
        )
        stop.wait()
    finally:
        undeploy()
        if local:
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


class _ClosesStream:
    """What ``Admitted.cancel`` calls on a cluster stream: closing it ends the replica's generation."""

    def __init__(self, events: AsyncGenerator[GenerationEvent, None]) -> None:
        self._events = events

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._events.aclose())
