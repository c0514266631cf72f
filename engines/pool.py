"""Loaded bases and merged variants: lazy, single-flight, reference-counted, evicted LRU within a budget.

The pool is driven from the asyncio loop; the slow parts (reading weights, downloading, merging) run in
worker threads. A failed load leaves no entry behind, so the same request can simply be retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from engines.adapters.files import (
    ADAPTER_FETCH_TIMEOUT,
    AdapterFiles,
    AdapterRef,
    check_base_match,
    check_tensor_ranks,
    fetch_adapter,
    read_adapter_files,
    resolve_adapter_ref,
)
from engines.adapters.variants import attach_unmerged, build_variant, check_adapter_fits, estimate_merge_bytes
from engines.catalog import BaseSpec, Catalog
from engines.errors import AdapterRejected, InsufficientMemory, Overloaded
from engines.forward.multilora import multilora_for, unsupported_reason
from engines.hub import HubFetcher
from engines.loader import BITSANDBYTES, BasePlan, LoadedModel, load_base, plan_base_load
from engines.memory import MemoryBudgets, mib
from engines.names import ModelName
from engines.threads import run_on_own_thread

log = logging.getLogger("peft_gateway.pool")

MERGED_SUFFIX = "#merged"


@dataclass
class PoolEntry:
    """A loaded model plus the bookkeeping that decides when it may be evicted."""

    key: str
    loaded: LoadedModel
    base_key: str | None = None
    users: int = 0
    dependents: int = 0
    last_used: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def idle(self) -> bool:
        return self.users == 0 and self.dependents == 0


@dataclass
class PoolStats:
    """Counters the metrics endpoint reads."""

    loads: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    evictions: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def bump(counter: dict[str, Any], key: str, amount: float = 1) -> None:
        counter[key] = counter.get(key, 0) + amount


class Lease:
    """A loaded model held for one request; release it when the request ends (async with)."""

    def __init__(self, pool: ModelPool, entry: PoolEntry, model_id: str) -> None:
        self._pool = pool
        self._entry: PoolEntry | None = entry
        self.model_id = model_id
        self.loaded = entry.loaded

    def release(self) -> None:
        if self._entry is not None:
            self._pool._release(self._entry)
            self._entry = None

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class ModelPool:
    """Holds loaded models by key. Bases are keyed by name, variants by ``base+adapter-source@rev``.

    Every load is checked against the memory budget of its device before it starts: idle entries are
    evicted (least recently used first) when that makes room, and otherwise the request is refused with
    what it needs, what is free and what to change, while everything loaded keeps serving.
    """

    #: How often a request retries when the entry it waited for was evicted before it could lease it.
    LEASE_ATTEMPTS = 8

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_bytes: int | None = None,
        max_models: int | None = None,
        budgets: MemoryBudgets | None = None,
        base_loader: Callable[[BaseSpec, BasePlan], LoadedModel] = load_base,
        merge_after: int = 16,
        max_merged_per_base: int = 2,
        fetcher: HubFetcher | None = None,
    ) -> None:
        #: Hub access with the engine's deadline, negative cache and shutdown cancellation.
        self.fetcher = fetcher or HubFetcher(timeout=ADAPTER_FETCH_TIMEOUT)
        self.merge_after = merge_after
        self.max_merged_per_base = max_merged_per_base
        self._adapter_requests: dict[str, int] = {}
        self._promotions: set[asyncio.Task[PoolEntry]] = set()
        self.catalog = catalog
        self.budgets = budgets if budgets is not None else MemoryBudgets(configured=max_bytes, unlimited=True)
        self.max_models = max_models
        self.stats = PoolStats()
        self._entries: dict[str, PoolEntry] = {}
        self._loading: dict[str, asyncio.Task[PoolEntry]] = {}
        self._base_loader = base_loader

    def entries(self) -> list[PoolEntry]:
        return list(self._entries.values())

    @property
    def bytes_held(self) -> int:
        return sum(self._held(device) for device in {e.loaded.device for e in self._entries.values()})

    def _held(self, device: str) -> int:
        """Bytes the entries on ``device`` hold: own tensors, plus each base's unmerged adapter slots as
        padded in memory (an unmerged variant's own ``nbytes`` is only its share of those)."""
        total = 0
        for entry in self._entries.values():
            if entry.loaded.device != device:
                continue
            if entry.loaded.adapter_slot:
                continue
            total += entry.loaded.nbytes
            if entry.base_key is None and entry.loaded.multilora is not None:
                total += entry.loaded.multilora.nbytes
        return total

    def _sync_budget(self, device: str) -> None:
        self.budgets.for_device(device).set_weights(self._held(device))

    async def acquire(self, name: ModelName) -> Lease:
        """Load what ``name`` needs (once, however many ask at the same time) and hold it."""
        for _attempt in range(self.LEASE_ATTEMPTS):
            lease = await self._try_acquire(name)
            if lease is not None:
                return lease
        raise Overloaded(
            f"'{name.base}{'+' + name.adapter if name.adapter else ''}' was evicted {self.LEASE_ATTEMPTS} times before this request could use it: the "
            "model cache is too small for the models in demand. Retry later or raise [cache] max_memory.",
            retry_after=5,
        )

    async def _try_acquire(self, name: ModelName) -> Lease | None:
        """A lease, or ``None`` when what was loaded got evicted before this request could hold it.

        Between a load finishing and a waiting request resuming, other requests run and may evict the
        fresh entry (freeing its adapter slot). Leasing therefore re-checks, with no await in between,
        that the entry is still the pool's; a lease is never taken on an evicted entry.
        """
        spec = self.catalog.base(name.base)
        if name.adapter is None:
            base_entry = await self._get_base(spec)
            return self._lease(base_entry, spec.name) if self._live(base_entry) else None
        if spec.quantization in BITSANDBYTES:
            raise AdapterRejected(
                f"Base '{spec.name}' is loaded with bitsandbytes {spec.quantization} quantization, which "
                'this gateway serves without adapters. Use quantization = "int8" (CPU; adapters are '
                'served unmerged on it) or "none" to serve adapters on it.'
            )
        ref = resolve_adapter_ref(self.catalog, spec, name.adapter, name.revision)
        model_id = f"{spec.name}+{ref.alias or name.adapter}" + (f"@{name.revision}" if name.revision else "")
        variant_key = f"{spec.name}+{ref.key}"
        merged_key = variant_key + MERGED_SUFFIX
        if spec.adapter_mode == "auto" and merged_key in self._entries:
            return self._lease(self._entries[merged_key], model_id)
        if variant_key in self._entries:
            entry: PoolEntry | None = self._entries[variant_key]
        else:
            base = await self._get_base(spec)
            if not self._live(base):
                return None
            base.dependents += 1  # pin the base while its variant is being built
            try:
                entry = await self._get(
                    variant_key,
                    lambda: self._load_variant(spec, base, ref, model_id),
                    base_key=spec.name,
                )
            finally:
                base.dependents -= 1
        if entry is None or not self._live(entry):
            return None
        if spec.adapter_mode == "auto" and entry.loaded.multilora is not None and spec.quantization == "none":
            self._count_for_promotion(spec, ref, model_id, variant_key)
        return self._lease(entry, model_id)

    def _live(self, entry: PoolEntry) -> bool:
        return self._entries.get(entry.key) is entry

    async def _get_base(self, spec: BaseSpec) -> PoolEntry:
        async def load() -> LoadedModel:
            budget = self.budgets.for_device(spec.device)
            room = None if budget.unlimited else budget.total - budget.kv - self._held_in_use(spec.device)
            plan = await run_on_own_thread(plan_base_load, spec, room, self.fetcher)
            self.make_room(spec.name, plan.peak_bytes, spec.device, what=f"as {plan.dtype}")
            return await run_on_own_thread(self._base_loader, spec, plan)

        return await self._get(spec.name, load)

    def _held_in_use(self, device: str) -> int:
        """Bytes on ``device`` that eviction cannot free: entries in use and bases with variants."""
        evictable = sum(
            entry.loaded.nbytes
            for entry in self._entries.values()
            if entry.idle and entry.loaded.device == device and not entry.loaded.adapter_slot
        )
        return self._held(device) - evictable

    def make_room(self, key: str, estimate: int, device: str = "cpu", *, what: str = "") -> None:
        """Before loading ``key``: evict idle entries until it fits the budget, or refuse with 503 now."""
        budget = self.budgets.for_device(device)
        loading = f"'{key}'" + (f" {what}" if what else "")
        if not budget.unlimited and estimate > budget.total - budget.kv:
            raise InsufficientMemory(
                f"Loading {loading} needs about {mib(estimate)}, more than this gateway's whole memory "
                f"budget on {device} can give it ({budget.describe()}). Choose a smaller dtype "
                '(dtype = "bfloat16"), serve adapters unmerged (adapter_mode = "multi"), or raise '
                "[cache] max_memory if the machine has more free."
            )
        if not self._enforce_budget(device, extra_models=1, extra_bytes=estimate):
            raise Overloaded(
                f"Not enough free memory to load {loading} (about {mib(estimate)}) while other models "
                f"are in use ({budget.describe()}); retry later, or raise [cache] max_memory / max_models.",
                retry_after=5,
            )

    def evict_for(self, device: str, nbytes: int) -> bool:
        """Evict idle entries until ``nbytes`` of the device's budget are free (KV caches need it)."""
        return self._enforce_budget(device, extra_bytes=nbytes)

    def _count_for_promotion(self, spec: BaseSpec, ref: AdapterRef, model_id: str, variant_key: str) -> None:
        """In ``auto`` mode, a busy adapter gets a merged variant (no per-token LoRA cost) in the background."""
        count = self._adapter_requests[variant_key] = self._adapter_requests.get(variant_key, 0) + 1
        merged_key = variant_key + MERGED_SUFFIX
        merged_now = sum(
            1
            for key in [*self._entries, *self._loading]
            if key.startswith(f"{spec.name}+") and key.endswith(MERGED_SUFFIX)
        )
        if count < self.merge_after or merged_key in self._loading or merged_now >= self.max_merged_per_base:
            return
        base = self._entries.get(spec.name)
        if base is None:
            return

        async def promote() -> PoolEntry:
            base.dependents += 1
            try:
                return await self._get(
                    merged_key,
                    lambda: self._load_variant(spec, base, ref, model_id, promote=True),
                    base_key=spec.name,
                )
            finally:
                base.dependents -= 1

        task = asyncio.ensure_future(promote())
        self._promotions.add(task)
        task.add_done_callback(self._promotion_done)
        log.info("promoting busy adapter %s to a merged variant", model_id)

    def _promotion_done(self, task: asyncio.Task[PoolEntry]) -> None:
        self._promotions.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("promotion to a merged variant failed: %s", task.exception())

    def variant_key(self, base: str, adapter: str, revision: str | None = None) -> str:
        """The pool key ``base+adapter`` would be stored under (raises if it cannot resolve)."""
        spec = self.catalog.base(base)
        return f"{spec.name}+{resolve_adapter_ref(self.catalog, spec, adapter, revision).key}"

    async def _load_variant(
        self, spec: BaseSpec, base: PoolEntry, ref: AdapterRef, model_id: str, *, promote: bool = False
    ) -> LoadedModel:
        """Merge where a merged copy fits beside what is loaded; otherwise serve the adapter unmerged.

        ``merge`` mode merges when the merged variant's new tensors (plus one layer's temporary) fit the
        free budget now, without evicting anything; an all-projection adapter on a 7B base is a second
        copy of the model and goes unmerged on the shared base instead. ``multi``/``auto`` serve
        unmerged and merge only to promote a busy adapter, again only where it fits.
        """
        policy = self.catalog.policy

        def check() -> AdapterFiles:
            folder = fetch_adapter(ref, self.fetcher)
            files = read_adapter_files(ref, folder, policy)
            check_base_match(files, spec, policy)
            check_tensor_ranks(files, policy)
            check_adapter_fits(files, base.loaded)
            return files

        files = await run_on_own_thread(check)
        device = base.loaded.device
        if spec.quantization == "int8":
            return await self._attach_to_int8(spec, base, files, model_id)
        budget = self.budgets.for_device(device)
        unmergeable = unsupported_reason(files.config)
        merge_need = estimate_merge_bytes(files, base.loaded)
        merged_fits = budget.unlimited or merge_need <= budget.free
        wants_merge = promote or spec.adapter_mode == "merge"
        if unmergeable is not None or (wants_merge and merged_fits):
            if not merged_fits and promote:
                raise InsufficientMemory(f"A merged copy of {model_id} ({mib(merge_need)}) does not fit.")
            if unmergeable is not None and not wants_merge:
                log.info("adapter %s uses %s: serving it merged instead of unmerged", model_id, unmergeable)
            self.make_room(model_id, merge_need, device, what="merged")
            return await run_on_own_thread(build_variant, base.loaded, files, model_id)
        if spec.adapter_mode == "merge":
            reason = (
                f"a merged copy needs {mib(merge_need)} and the memory budget has {mib(budget.free)} free "
                "beside what is loaded"
            )
        else:
            reason = f"adapter_mode = {spec.adapter_mode!r}"
        return await self._attach_unmerged(base, files, model_id, reason)

    async def _attach_unmerged(
        self, base: PoolEntry, files: AdapterFiles, model_id: str, reason: str
    ) -> LoadedModel:
        """Room for the adapter's slots on the shared base (evicting idle entries if needed), then attach."""
        registry = multilora_for(base.loaded.model)
        needed = registry.added_bytes(files.config, files.weights_file)
        self.make_room(model_id, needed, base.loaded.device, what="unmerged")
        return await run_on_own_thread(attach_unmerged, base.loaded, files, model_id, reason)

    async def _attach_to_int8(
        self, spec: BaseSpec, base: PoolEntry, files: AdapterFiles, model_id: str
    ) -> LoadedModel:
        """On an int8 base an adapter is always served unmerged: merging would re-quantize its delta away."""
        unservable = unsupported_reason(files.config)
        if unservable is not None:
            raise AdapterRejected(
                f"Adapter '{files.ref.label}' uses {unservable}, which needs a merged copy; base "
                f"'{spec.name}' has int8 weights, into which adapters are never merged. Serve it on a base "
                'configured with quantization = "none".'
            )
        reason = "the base has int8 weights: adapters are applied unmerged on top, never merged into them"
        return await self._attach_unmerged(base, files, model_id, reason)

    def _lease(self, entry: PoolEntry, model_id: str) -> Lease:
        assert self._live(entry), "an evicted entry must never be leased"
        entry.users += 1
        entry.last_used = time.monotonic()
        return Lease(self, entry, model_id)

    def _release(self, entry: PoolEntry) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        self._enforce_budget(entry.loaded.device)

    async def _get(
        self,
        key: str,
        load: Callable[[], Awaitable[LoadedModel]],
        *,
        base_key: str | None = None,
    ) -> PoolEntry:
        entry = self._entries.get(key)
        if entry is not None:
            PoolStats.bump(self.stats.hits, key)
            entry.last_used = time.monotonic()
            return entry
        task = self._loading.get(key)
        if task is None:
            PoolStats.bump(self.stats.misses, key)
            task = asyncio.ensure_future(self._load_entry(key, load, base_key))
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load_entry(
        self, key: str, load: Callable[[], Awaitable[LoadedModel]], base_key: str | None
    ) -> PoolEntry:
        started = time.perf_counter()
        loaded = await load()
        PoolStats.bump(self.stats.loads, key)
        PoolStats.bump(self.stats.load_seconds, key, time.perf_counter() - started)
        entry = PoolEntry(key=key, loaded=loaded, base_key=base_key)
        if base_key is not None and base_key in self._entries:
            self._entries[base_key].dependents += 1
        self._entries[key] = entry
        self._sync_budget(loaded.device)
        entry.users += 1  # protect the fresh entry from its own budget check
        try:
            if not self._enforce_budget(loaded.device):
                self._drop(entry)
                raise Overloaded(
                    f"Not enough room in the model cache for '{loaded.name}' "
                    f"({mib(loaded.nbytes)}) while other models are in use; retry later "
                    "or raise [cache] max_memory.",
                    retry_after=5,
                )
        finally:
            entry.users -= 1
        return entry

    def _over_budget(self, device: str, extra_models: int = 0, extra_bytes: int = 0) -> bool:
        if self.max_models is not None and len(self._entries) + extra_models > self.max_models:
            return True
        budget = self.budgets.for_device(device)
        return not budget.unlimited and self._held(device) + extra_bytes > budget.total - budget.kv

    def _enforce_budget(self, device: str = "cpu", extra_models: int = 0, extra_bytes: int = 0) -> bool:
        """Evict idle entries, least recently used first, until the budget holds with room for the extras.

        Returns whether it holds: False when everything left is in use.
        """
        while self._over_budget(device, extra_models, extra_bytes):
            idle = [entry for entry in self._entries.values() if entry.idle]
            if not idle:
                return False
            victim = min(idle, key=lambda entry: entry.last_used)
            self._drop(victim)
            PoolStats.bump(self.stats.evictions, victim.key)
            log.info("evicted %s (%s)", victim.key, mib(victim.loaded.nbytes))
        return True

    def _drop(self, entry: PoolEntry) -> None:
        self._entries.pop(entry.key, None)
        if entry.loaded.multilora is not None and entry.loaded.adapter_slot:
            entry.loaded.multilora.remove(entry.loaded.adapter_slot)
        if entry.base_key is not None and entry.base_key in self._entries:
            self._entries[entry.base_key].dependents -= 1
        self._sync_budget(entry.loaded.device)

    def unload(self, key: str) -> bool:
        """Drop an idle entry now; False when it is unknown or in use."""
        entry = self._entries.get(key)
        if entry is None or not entry.idle:
            return False
        self._drop(entry)
        return True
