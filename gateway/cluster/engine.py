"""The ingress's engine: an engine-like client of the engine replicas on a Ray cluster.

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
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from engines.catalog import Catalog
from engines.engine import Admitted, Engine, GenerationReport, ModelInfo
from engines.errors import EngineError
from engines.generation import ChatMessage, GenerationEvent, GenerationRequest
from engines.grammar import CompiledGrammar, Constraint, GrammarCache
from engines.pool import Lease, ModelPool
from engines.ray_replica import (
    ModelFacts,
    NotInCluster,
    ReplicaFailed,
    ReplicaSnapshot,
    ReplicaUnavailable,
    routing_key,
)
from engines.vocabulary import CountsVocabulary
from gateway.cluster.header import CURRENT_REPLICA
from gateway.settings import Settings

log = logging.getLogger("peft_gateway.ray")

#: A request whose replica died before it produced anything is sent again, this many times at most.
RETRIES = 3
RETRY_PAUSE_SECONDS = 0.5
SNAPSHOT_POLL_SECONDS = 1.0
FACTS_CACHE_SIZE = 4096
TOKENIZER_CACHE_SIZE = 64


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

    def cancel_fetches(self) -> None:
        """Nothing to cancel here: Hub fetches run in the replicas, which their own shutdown ends."""

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
    def pool(self) -> ModelPool:
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


class _ClosesStream:
    """What ``Admitted.cancel`` calls on a cluster stream: closing it ends the replica's generation."""

    def __init__(self, events: AsyncGenerator[GenerationEvent, None]) -> None:
        self._events = events

    def cancel(self) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._events.aclose())
