"""The engine's one entry point for the gateway: resolve a model name, prepare a prompt, stream tokens.

It bridges the worker thread (``Scheduler``) to asyncio: events are handed to the event loop with
``call_soon_threadsafe`` and read from an ``asyncio.Queue``; leaving the async iterator early (client
gone) cancels the sequence, which the worker drops at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from engines.adapters.files import CachedAdapter, cached_adapters, same_model
from engines.catalog import Catalog
from engines.errors import ContextLengthExceeded, EngineError, InvalidGenerationRequest
from engines.generation import ChatMessage, GenerationEvent, GenerationRequest
from engines.grammar import CompiledGrammar, Constraint, GrammarCache
from engines.hub import HubFetcher
from engines.kv_budget import batch_bound, kv_bytes_per_token
from engines.memory import MemoryBudgets
from engines.names import ModelName
from engines.pool import Lease, ModelPool, PoolEntry
from engines.prompts import encode_text, render_chat
from engines.sampling import SamplingParams
from engines.scheduler import Scheduler
from engines.sequence import Sequence
from engines.template_sandbox import DEFAULT_RENDER_LIMITS, RenderLimits

CACHE_SCAN_SECONDS = 10.0


class ServedModel(Protocol):
    """What the routes read of a lease's model: ``LoadedModel``, or its stand-in on a cluster."""

    @property
    def name(self) -> str: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def context_length(self) -> int: ...
    @property
    def sampling_defaults(self) -> dict[str, float]: ...
    @property
    def parent(self) -> str | None: ...
    @property
    def root(self) -> str | None: ...
    @property
    def load_seconds(self) -> float: ...
    @property
    def vocab_size(self) -> int: ...


class EngineLease(Protocol):
    """A held model: what a route reads while it serves a request, and gives back when done."""

    @property
    def model_id(self) -> str: ...
    @property
    def loaded(self) -> ServedModel: ...
    def release(self) -> None: ...


class SchedulerState(Protocol):
    """``/ready`` asks whether the engine's worker is running."""

    @property
    def alive(self) -> bool: ...


LeaseT = TypeVar("LeaseT", bound=EngineLease)


@runtime_checkable
class EngineApi(Protocol[LeaseT]):
    """Everything the routes use of ``app.state.engine``.

    Satisfied by the in-process ``Engine`` and by the Ray ingress's ``ClusterEngine``
    (``gateway.cluster.engine``), so the routes, their validation and their framing are one code for
    both. Generic in the engine's own lease type: each engine takes back only the leases it gave out.
    The admin routes' ``pool`` is the local pool; a cluster answers its uses with a typed refusal.
    """

    catalog: Catalog
    reporters: list[Callable[[GenerationReport], None]]

    @property
    def scheduler(self) -> SchedulerState: ...
    @property
    def pool(self) -> ModelPool: ...
    def loaded_model_names(self) -> list[tuple[str, str]]: ...
    def models(self) -> list[ModelInfo]: ...
    def cancel_fetches(self) -> None: ...
    def close(self) -> None: ...
    async def acquire(self, model: str) -> LeaseT: ...
    def chat_request(
        self,
        lease: LeaseT,
        messages: list[ChatMessage],
        *,
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        request_id: str = "",
        ignore_eos: bool = False,
        tools: list[dict[str, Any]] | None = None,
        limits: RenderLimits = DEFAULT_RENDER_LIMITS,
    ) -> GenerationRequest: ...
    def text_request(
        self,
        lease: LeaseT,
        prompt: str | list[int],
        *,
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        request_id: str = "",
        ignore_eos: bool = False,
        prompt_logprobs: int | None = None,
    ) -> GenerationRequest: ...
    async def compile_grammar(self, lease: LeaseT, constraint: Constraint) -> CompiledGrammar: ...
    def admit(self, lease: LeaseT, request: GenerationRequest) -> Admitted: ...


#: What a route holds: some engine, whatever its lease type.
AnyEngine = EngineApi[Any]


@dataclass(frozen=True)
class ModelInfo:
    """A row of ``/v1/models``."""

    id: str
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
    loaded: bool = False
    dtype: str | None = None
    context_length: int | None = None
    cached: bool = False
    #: Why ``dtype`` was chosen, and for an adapter whether it is served merged or unmerged and why.
    decisions: MemoryDecisions | None = None


@dataclass(frozen=True)
class MemoryDecisions:
    """What the memory budget decided for a loaded model (shown in ``/v1/models`` and logged)."""

    dtype_reason: str | None
    serving: str | None
    serving_reason: str | None
    #: "int8" for the engine's int8 weights (``None``: as ``dtype`` says).
    quantization: str | None = None


@dataclass(frozen=True)
class GenerationReport:
    """What one finished (or abandoned) sequence cost: the gateway turns these into metrics."""

    model: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    seconds: float
    finish_reason: str | None

    @classmethod
    def of(
        cls,
        model: str,
        request: GenerationRequest,
        last: GenerationEvent | None,
        first: float | None,
        started: float,
    ) -> GenerationReport:
        """The report of a sequence whose last event was ``last``, started at ``started`` (perf_counter)."""
        return cls(
            model=model,
            request_id=request.request_id,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=last.completion_tokens if last else 0,
            time_to_first_token=first,
            seconds=time.perf_counter() - started,
            finish_reason=(last.finish_reason if last else None)
            or ("error" if last and last.error else None),
        )


@dataclass(frozen=True)
class EngineLimits:
    max_memory_bytes: int | None = None
    max_models: int | None = None
    max_batch: int = 16
    max_waiting: int = 64
    prefill_chunk: int = 512
    prefix_cache_bytes: int = 256 * 2**20
    threads: int = 0
    lean_decode: bool = True
    #: bf16/float16 decode steps batch-invariant too, at a cost (``[engine] deterministic``).
    deterministic: bool = False
    #: Deadline of one adapter fetch from the Hub, seconds (``[hub] fetch_timeout``).
    fetch_timeout: float = 300.0
    #: How long a "not on the Hub" answer is remembered, seconds (``[hub] negative_cache_seconds``).
    negative_cache_seconds: float = 60.0


def _decisions(entry: PoolEntry | None) -> MemoryDecisions | None:
    if entry is None:
        return None
    loaded = entry.loaded
    quantization = loaded.quantization if loaded.quantization != "none" else None
    return MemoryDecisions(
        loaded.dtype_reason or None, loaded.serving, loaded.serving_reason or None, quantization
    )


class Engine:
    """Catalog + pool + scheduler, owned by the gateway app (``app.state.engine``)."""

    def __init__(self, catalog: Catalog, limits: EngineLimits = EngineLimits()) -> None:
        self.created = int(time.time())
        self._cached_scan: tuple[float, list[CachedAdapter]] | None = None
        self.budgets = MemoryBudgets(configured=limits.max_memory_bytes)
        self.budgets.for_device("cpu")  # measured (and logged) now, before anything is loaded
        self.hub = HubFetcher(timeout=limits.fetch_timeout, negative_ttl=limits.negative_cache_seconds)
        self.pool = ModelPool(catalog, budgets=self.budgets, max_models=limits.max_models, fetcher=self.hub)
        self.scheduler = Scheduler(
            budgets=self.budgets,
            max_active=limits.max_batch,
            max_waiting=limits.max_waiting,
            prefill_chunk=limits.prefill_chunk,
            prefix_cache_bytes=limits.prefix_cache_bytes,
            threads=limits.threads,
            lean_decode=limits.lean_decode,
            deterministic=limits.deterministic,
        )
        self.reporters: list[Callable[[GenerationReport], None]] = []
        self.grammars = GrammarCache()

    @property
    def catalog(self) -> Catalog:
        return self.pool.catalog

    @catalog.setter
    def catalog(self, value: Catalog) -> None:
        self.pool.catalog = value

    def loaded_model_names(self) -> list[tuple[str, str]]:
        """``(pool key or public name, public name)`` of every loaded model: metric labels learn these."""
        return [
            (alias, entry.loaded.name)
            for entry in self.pool.entries()
            for alias in (entry.key, entry.loaded.name)
        ]

    def models(self) -> list[ModelInfo]:
        """Configured bases and adapters, plus every loaded variant, with ``parent``/``root``."""
        loaded = {entry.key: entry for entry in self.pool.entries()}
        rows: list[ModelInfo] = []
        for base in self.catalog.bases:
            entry = loaded.get(base.name)
            rows.append(
                ModelInfo(
                    id=base.name,
                    created=entry.created if entry else self.created,
                    owned_by="peft-gateway",
                    root=base.source,
                    loaded=entry is not None,
                    dtype=entry.loaded.dtype if entry else None,
                    context_length=entry.loaded.context_length if entry else base.context_length,
                    decisions=_decisions(entry),
                )
            )
        listed: set[str] = set()
        for adapter in self.catalog.adapters:
            try:
                variant = loaded.get(self.pool.variant_key(adapter.base, adapter.alias))
            except EngineError:
                variant = None
            if variant is not None:
                listed.add(variant.key)
            rows.append(
                ModelInfo(
                    id=f"{adapter.base}+{adapter.alias}",
                    created=variant.created if variant else self.created,
                    owned_by="peft-gateway",
                    parent=adapter.base,
                    root=adapter.source,
                    loaded=variant is not None,
                    dtype=variant.loaded.dtype if variant else None,
                    decisions=_decisions(variant),
                )
            )
        rows.extend(self._cached_rows({row.id for row in rows} | {e.loaded.name for e in loaded.values()}))
        for entry in loaded.values():
            if entry.base_key is None or entry.key in listed:
                continue
            rows.append(
                ModelInfo(
                    id=entry.loaded.name,
                    created=entry.created,
                    owned_by="peft-gateway",
                    parent=entry.base_key,
                    root=entry.loaded.root,
                    loaded=True,
                    dtype=entry.loaded.dtype,
                    context_length=entry.loaded.context_length,
                    decisions=_decisions(entry),
                )
            )
        return rows

    def _cached_rows(self, taken: set[str]) -> list[ModelInfo]:
        """Hub adapters already in the local HF cache, under each base they declare (usable offline)."""
        now = time.monotonic()
        if self._cached_scan is None or now - self._cached_scan[0] > CACHE_SCAN_SECONDS:
            self._cached_scan = (now, cached_adapters())
        rows = []
        for adapter in self._cached_scan[1]:
            try:
                modified = int(adapter.folder.stat().st_mtime)
            except OSError:  # removed since the scan: one gone folder must not fail the listing
                continue
            for base in self.catalog.bases:
                model_id = f"{base.name}+{adapter.repo_id}"
                if (
                    model_id in taken
                    or not adapter.base_model
                    or not same_model(adapter.base_model, base.known_names())
                ):
                    continue
                rows.append(
                    ModelInfo(
                        id=model_id,
                        created=modified,
                        owned_by="peft-gateway",
                        parent=base.name,
                        root=adapter.repo_id,
                        cached=True,
                    )
                )
        return rows

    def cancel_fetches(self) -> None:
        """Fail every Hub fetch now waiting (and every later one): call it as shutdown begins.

        A request waiting on a stalled Hub then gets its error at once instead of holding shutdown for
        up to ``[hub] fetch_timeout``.
        """
        self.hub.cancel()

    def close(self) -> None:
        self.cancel_fetches()
        self.scheduler.close()

    async def acquire(self, model: str) -> Lease:
        """Parse ``model`` and hold the loaded base or variant it names (loading it if needed)."""
        name = ModelName.parse(model)
        # A base (or base alias) always wins over an adapter alias of the same name, so that no alias
        # can take over the traffic of a base.
        is_base = any(name.base == b.name or name.base in b.aliases for b in self.catalog.bases)
        spec = self.catalog.adapter_alias(name.base) if name.adapter is None and not is_base else None
        if spec is not None:  # a bare adapter alias means "<its base>+<alias>"
            name = ModelName(base=spec.base, adapter=spec.alias, revision=spec.revision)
        return await self.pool.acquire(name)

    def chat_request(
        self,
        lease: Lease,
        messages: list[ChatMessage],
        *,
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        request_id: str = "",
        ignore_eos: bool = False,
        tools: list[dict[str, Any]] | None = None,
        limits: RenderLimits = DEFAULT_RENDER_LIMITS,
    ) -> GenerationRequest:
        """Blocking (template render and tokenization): call it from a worker thread, not the loop."""
        prompt = render_chat(lease.loaded.tokenizer, messages, tools, limits)
        request = self._request(lease, prompt, max_tokens, sampling, stop, request_id, "messages")
        return dataclasses.replace(request, ignore_eos=ignore_eos) if ignore_eos else request

    async def compile_grammar(self, lease: Lease, constraint: Constraint) -> CompiledGrammar:
        """Compile (or find in the cache) ``constraint`` for the leased model's tokenizer.

        Runs on a worker thread: a large schema can take a while to compile, and the event loop keeps
        serving every other stream meanwhile. An invalid or unenforceable grammar raises a 400.
        """
        loaded = lease.loaded
        return await asyncio.to_thread(
            self.grammars.compile, loaded.tokenizer, constraint, loaded.eos_token_ids
        )

    def text_request(
        self,
        lease: Lease,
        prompt: str | list[int],
        *,
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        request_id: str = "",
        ignore_eos: bool = False,
        prompt_logprobs: int | None = None,
    ) -> GenerationRequest:
        """A text prompt (or token ids) to continue; ``prompt_logprobs`` scores the prompt's own tokens."""
        ids = (
            list(prompt)
            if isinstance(prompt, list)
            else encode_text(lease.loaded.tokenizer, prompt, add_special_tokens=True)
        )
        vocab = lease.loaded.vocab_size
        if any(not 0 <= token < vocab for token in ids):
            raise InvalidGenerationRequest(f"Prompt token ids must be in [0, {vocab}).", param="prompt")
        request = self._request(lease, ids, max_tokens, sampling, stop, request_id, "prompt")
        return dataclasses.replace(request, ignore_eos=ignore_eos, prompt_logprobs=prompt_logprobs)

    def _request(
        self,
        lease: Lease,
        prompt: list[int],
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...],
        request_id: str,
        param: str,
    ) -> GenerationRequest:
        context = lease.loaded.context_length
        vocab = lease.loaded.vocab_size
        outside = [token for token in sampling.logit_bias if not 0 <= token < vocab]
        if outside:
            raise InvalidGenerationRequest(
                f"logit_bias names token ids outside this model's vocabulary [0, {vocab}): {outside[:5]}",
                param="logit_bias",
            )
        if not prompt:
            raise InvalidGenerationRequest("The prompt is empty.", param=param)
        room = context - len(prompt)
        # At least one new token unless the caller asked for none (``max_tokens: 0`` scores a prompt
        # that may fill the whole context).
        requested = max_tokens if max_tokens is not None else 1
        if len(prompt) + requested > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + requested} tokens ({len(prompt)} in the {param}, {requested} for the "
                "completion). Please reduce the length of the messages or completion.",
                param=param,
            )
        return GenerationRequest(
            prompt_ids=tuple(prompt),
            max_tokens=max_tokens if max_tokens is not None else room,
            sampling=sampling,
            stop=stop,
            request_id=request_id,
        )

    def _make_kv_room(self, lease: Lease, request: GenerationRequest) -> None:
        """Evict idle models if this request's KV cache, alone, would not fit the free budget.

        The engine thread makes the exact decision at admission (it knows what else is running); this
        only frees what the event loop's pool can free, which the engine thread cannot.
        """
        loaded = lease.loaded
        budget = self.budgets.for_device(loaded.device)
        if budget.unlimited:
            return
        per_token = kv_bytes_per_token(loaded.model)
        layers = int(getattr(loaded.model.config, "num_hidden_layers", 1) or 1)
        max_columns = loaded.context_length + 1
        longest = min(len(request.prompt_ids) + request.max_tokens + 1, max_columns)
        need = batch_bound(per_token, layers, 1, longest, max_columns)
        need += per_token * len(request.prompt_ids) + self.scheduler.prefix_cache_bytes
        if need > budget.free:
            self.pool.evict_for(loaded.device, need)

    def admit(self, lease: Lease, request: GenerationRequest) -> Admitted:
        """Queue ``request`` now, raising ``Overloaded`` when the engine is full.

        Admission happens here rather than at the first iteration of the events, so that a streaming
        route can still answer 503 (with Retry-After) before its status line is sent.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

        def emit(event: GenerationEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        sequence = Sequence(request, lease.loaded, emit)
        started = time.perf_counter()
        self._make_kv_room(lease, request)
        self.scheduler.submit(sequence)
        return Admitted(sequence, self._events(lease, request, sequence, queue, started))

    async def generate(
        self, lease: Lease, request: GenerationRequest
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream events for ``request``; closing the iterator early cancels the generation."""
        admitted = self.admit(lease, request)
        try:
            async with contextlib.aclosing(admitted.events) as events:
                async for event in events:
                    yield event
        finally:
            admitted.cancel()

    async def _events(
        self,
        lease: Lease,
        request: GenerationRequest,
        sequence: Sequence,
        queue: asyncio.Queue[GenerationEvent],
        started: float,
    ) -> AsyncGenerator[GenerationEvent, None]:
        first: float | None = None
        last: GenerationEvent | None = None
        try:
            while True:
                event = await queue.get()
                last = event
                if first is None and (event.text or event.done):
                    first = time.perf_counter() - started
                yield event
                if event.done:
                    return
        finally:
            sequence.cancel()
            report = GenerationReport.of(lease.model_id, request, last, first, started)
            for reporter in self.reporters:
                reporter(report)


@dataclass
class Admitted:
    """A queued sequence and its events; ``cancel`` drops it even if its events are never read."""

    sequence: Sequence
    events: AsyncGenerator[GenerationEvent, None]

    def cancel(self) -> None:
        self.sequence.cancel()
