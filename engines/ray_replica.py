"""The engine as a Ray Serve deployment: one ``Engine`` (pool, budget, scheduler) per replica.

Serve routes each request by its *multiplexed model id* (the canonical model name) to a replica that
already serves that name. Serve's multiplexing keeps its own per-replica LRU of ids and "unloads" the
least recently used one when the replica holds too many; here its loader returns only a small token
(:class:`RoutingToken`), so that eviction merely makes Serve forget the id for routing. Memory is the
pool's business: it loads on first use, keeps refcounts per request and evicts idle entries under its
own budget, so Serve can never free an adapter that a running request still uses.

Each replica publishes a :class:`ReplicaSnapshot` (what it holds, how busy it is) to a small named
actor, :class:`ReplicaDirectory`, from its health check; the HTTP ingress reads the directory for
``/v1/models`` and ``/metrics``. Nothing here imports the HTTP layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from engines.catalog import Catalog
from engines.engine import Engine, EngineLimits, ModelInfo
from engines.errors import EngineError, InvalidGenerationRequest, Overloaded
from engines.generation import GenerationRequest
from engines.grammar import DeferredGrammar
from engines.names import ModelName

#: Snapshots older than this are from replicas that died or were scaled down.
SNAPSHOT_STALE_SECONDS = 15.0
DIRECTORY_NAME = "peft-gateway-replica-directory"


class NotInCluster(InvalidGenerationRequest):
    """An operation that only makes sense in one process (changing a catalog or pool at run time)."""

    param = None
    code = "unsupported_in_cluster"


class ReplicaUnavailable(Overloaded):
    """The replica serving a request went away (or none could take it): retry, Serve replaces it."""

    code = "replica_unavailable"

    def __init__(self, message: str, *, retry_after: int = 2) -> None:
        super().__init__(message, retry_after=retry_after)


class ReplicaFailed(EngineError):
    """An engine replica failed in a way that is no fault of the request (a 500)."""

    code = "replica_failed"


@dataclass(frozen=True)
class RoutingToken:
    """What Serve's multiplexed loader keeps per model id: the id only, never weights or a lease."""

    model_id: str


@dataclass(frozen=True)
class ModelFacts:
    """What the ingress needs to prepare prompts for a model without holding its weights.

    The tokenizer travels once per tokenizer (``tokenizer_key``), not once per request: the ingress
    renders chat templates and tokenizes, as vLLM's API server does, so replicas only generate.
    """

    model_id: str
    tokenizer_key: str
    context_length: int
    sampling_defaults: dict[str, float]
    dtype: str
    device: str
    parent: str | None
    root: str | None
    load_seconds: float
    replica: str


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica's state for ``/v1/models`` and ``/metrics`` (plain data, pickled to the ingress)."""

    replica: str
    node: str
    time: float
    models: tuple[ModelInfo, ...]
    loaded: tuple[str, ...]
    cache_bytes: int
    queue_depth: int
    active_sequences: int
    requests: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_lora: int
    counters: dict[str, dict[str, float]] = field(default_factory=dict)


def routing_key(catalog: Catalog, model: str) -> str:
    """The name Serve routes by: base aliases and bare adapter aliases folded to ``base+adapter``.

    Computed in the ingress from the catalog alone (no files, no network), so that ``tiny-lora`` and
    ``tiny+tiny-lora`` land on the same replica. Unknown bases raise ``ModelNotFound`` here already.
    """
    name = ModelName.parse(model)
    spec = catalog.adapter_alias(name.base) if name.adapter is None else None
    if spec is not None:
        name = ModelName(base=spec.base, adapter=spec.alias, revision=spec.revision)
    base = catalog.base(name.base).name
    if name.adapter is None:
        return base
    return f"{base}+{name.adapter}" + (f"@{name.revision}" if name.revision else "")


class ReplicaDirectory:
    """A named Ray actor holding the latest snapshot of each engine replica (no polling of replicas)."""

    def __init__(self, stale_seconds: float = SNAPSHOT_STALE_SECONDS) -> None:
        self._stale_seconds = stale_seconds
        self._snapshots: dict[str, ReplicaSnapshot] = {}

    def publish(self, snapshot: ReplicaSnapshot) -> None:
        self._snapshots[snapshot.replica] = snapshot

    def forget(self, replica: str) -> None:
        self._snapshots.pop(replica, None)

    def snapshots(self) -> list[ReplicaSnapshot]:
        """Fresh snapshots only: a replica that stopped publishing is gone from the listing."""
        now = time.time()
        for name in [n for n, s in self._snapshots.items() if now - s.time > self._stale_seconds]:
            del self._snapshots[name]
        return sorted(self._snapshots.values(), key=lambda s: s.replica)


def _replica_name() -> str:
    """Serve's full replica id (also the replica actor's name), or the pid outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.to_full_id_str())
    except Exception:  # not inside a Serve replica (unit use)
        return f"pid-{os.getpid()}"


class EngineReplica:
    """The deployment's body. ``serve.deployment`` wraps a subclass made by :func:`replica_class`."""

    def __init__(self, catalog: Catalog, limits: EngineLimits, directory_namespace: str | None) -> None:
        self.engine = Engine(catalog, limits)
        self.limits = limits
        self.name = _replica_name()
        self.node = socket.gethostname()
        self._directory_namespace = directory_namespace
        self._directory: Any = None
        self._requests = 0
        self._waiting: dict[str, int] = {}
        self._running: dict[str, int] = {}

    async def _routing_token(self, model_id: str) -> RoutingToken:  # replaced by serve.multiplexed
        return RoutingToken(model_id)

    async def _track(self) -> None:
        """Tell Serve this replica now serves the request's model id (routing only, see module doc)."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._routing_token(model_id)

    async def describe(self, model_id: str, known_tokenizers: frozenset[str]) -> tuple[str, Any]:
        """Load ``model_id`` here if needed: ``("facts", (facts, tokenizer or None))`` or ``("error", exc)``.

        The tokenizer is sent only when the ingress does not hold it yet (``known_tokenizers``).
        Engine errors are returned, not raised, so that they cross Ray as themselves.
        """
        await self._track()
        try:
            lease = await self.engine.acquire(model_id)
        except EngineError as exc:
            return "error", exc
        try:
            loaded = lease.loaded
            base = next((e for e in self.engine.pool.entries() if e.key == loaded.parent), None)
            shares_base_tokenizer = base is not None and base.loaded.tokenizer is loaded.tokenizer
            facts = ModelFacts(
                model_id=lease.model_id,
                tokenizer_key=base.key if base is not None and shares_base_tokenizer else lease.model_id,
                context_length=loaded.context_length,
                sampling_defaults=dict(loaded.sampling_defaults),
                dtype=loaded.dtype,
                device=loaded.device,
                parent=loaded.parent,
                root=loaded.root,
                load_seconds=loaded.load_seconds,
                replica=self.name,
            )
            send = facts.tokenizer_key not in known_tokenizers
            return "facts", (facts, loaded.tokenizer if send else None)
        finally:
            lease.release()

    async def generate(
        self, model_id: str, request: GenerationRequest
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """Stream ``("replica", name)`` and ``("event", GenerationEvent)``s, or ``("error", exc)``.

        The name travels in the same item as the first event (``("named", (name, event))``): the
        ingress holds the response's headers until it knows the replica, and every item is a Ray
        object on the way to the first token. An error before any event is preceded by the name.
        The pool lease is held for the whole stream and released when it ends or is abandoned (the
        ingress closed it, or the client went away), so the variant cannot be evicted under it.
        """
        named = False
        self._requests += 1
        self._bump(self._waiting, model_id, 1)
        waiting = True
        try:
            # Claim the name for routing only if this replica already had the model: a stream that
            # lands here only because Serve had not yet heard which replica ``describe`` loaded it on
            # must not make the name live on two replicas from then on.
            if any(entry.loaded.name == model_id for entry in self.engine.pool.entries()):
                await self._track()
            lease = await self.engine.acquire(model_id)
            try:
                if isinstance(request.grammar, DeferredGrammar):
                    compiled = await self.engine.compile_grammar(lease, request.grammar.constraint)
                    request = dataclasses.replace(request, grammar=compiled)
                async with contextlib.aclosing(self.engine.generate(lease, request)) as events:
                    async for event in events:
                        if waiting:
                            waiting = False
                            self._bump(self._waiting, model_id, -1)
                            self._bump(self._running, model_id, 1)
                        if not named:
                            named = True
                            yield "named", (self.name, event)
                            continue
                        yield "event", event
            finally:
                lease.release()
        except EngineError as exc:
            if not named:
                yield "replica", self.name
            yield "error", exc
        finally:
            self._bump(self._waiting if waiting else self._running, model_id, -1)

    @staticmethod
    def _bump(counts: dict[str, int], key: str, amount: int) -> None:
        counts[key] = counts.get(key, 0) + amount
        if counts[key] <= 0:
            del counts[key]

    def snapshot(self) -> ReplicaSnapshot:
        pool = self.engine.pool
        stats = pool.stats
        return ReplicaSnapshot(
            replica=self.name,
            node=self.node,
            time=time.time(),
            models=tuple(self.engine.models()),
            loaded=tuple(sorted(entry.key for entry in pool.entries())),
            cache_bytes=pool.bytes_held,
            queue_depth=self.engine.scheduler.queue_depth,
            active_sequences=self.engine.scheduler.active_count,
            requests=self._requests,
            running_adapters=tuple(sorted(k for k in self._running if "+" in k)),
            waiting_adapters=tuple(sorted(k for k in self._waiting if "+" in k)),
            max_lora=self.limits.max_batch,
            counters={
                "loads": dict(stats.loads),
                "hits": dict(stats.hits),
                "misses": dict(stats.misses),
                "evictions": dict(stats.evictions),
            },
        )

    def check_health(self) -> None:
        """Serve's periodic health check: fail if the engine thread died; publish a snapshot.

        Publishing is fire-and-forget, so a slow or missing directory never fails the health check.
        """
        if not self.engine.scheduler.alive:
            raise RuntimeError("the engine's worker thread is not running")
        directory = self._find_directory()
        if directory is not None:
            directory.publish.remote(self.snapshot())

    def _find_directory(self) -> Any:
        if self._directory is None and self._directory_namespace is not None:
            import ray

            with contextlib.suppress(ValueError):
                self._directory = ray.get_actor(DIRECTORY_NAME, namespace=self._directory_namespace)
        return self._directory

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def replica_class(max_models_per_replica: int) -> type[EngineReplica]:
    """``EngineReplica`` with Serve's multiplexed loader sized to ``max_models_per_replica`` ids."""
    from ray import serve

    class MultiplexedEngineReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)  # type: ignore[untyped-decorator]
        async def _routing_token(self, model_id: str) -> RoutingToken:
            return RoutingToken(model_id)

    MultiplexedEngineReplica.__name__ = MultiplexedEngineReplica.__qualname__ = "EngineReplica"
    return MultiplexedEngineReplica
