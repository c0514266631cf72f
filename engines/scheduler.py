"""The engine's decode loop: one worker thread that owns every forward pass, with continuous batching.

Running all model work on one thread keeps torch's own thread pool from being oversubscribed and gives
one place to decide what runs next. Each iteration:

1. admits waiting requests (up to ``max_active``) into the prefill queue;
2. prefills at most ``prefill_chunk`` prompt tokens, so a long prompt cannot stall running streams for
   more than one chunk; a fully prefilled sequence joins its model's decode batch;
3. advances every model's batch by one token in a single forward pass: all sequences of one model share
   a left-padded, pre-allocated KV cache (``BatchKVCache``), each keeps its own sampling state.

A finished or cancelled sequence leaves its batch before the next step and frees its row.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engines.errors import InsufficientMemory, Overloaded
from engines.forward import run as forward
from engines.forward.kvcache import BatchKVCache
from engines.forward.lean import LeanDecoder
from engines.kv_budget import batch_bound, kv_bytes_per_token
from engines.loader import LoadedModel
from engines.memory import MemoryBudget, MemoryBudgets, mib
from engines.prefix_cache import PrefixCache, PrefixView, cache_from_prefix
from engines.prompt_logprobs import score_rows, scored_chunk_tokens
from engines.sequence import Sequence

log = logging.getLogger("peft_gateway.scheduler")


def kv_too_large(sequence: Sequence, need: int, budget: MemoryBudget) -> InsufficientMemory:
    request = sequence.request
    return InsufficientMemory(
        f"This request may need {mib(need)} of KV cache ({len(request.prompt_ids)} prompt tokens plus up "
        f"to {request.max_tokens} new ones), more than the memory budget can hold beside the loaded "
        f"weights ({budget.describe()}). Lower max_tokens or shorten the prompt, set a smaller "
        "context_length for this model, or raise [cache] max_memory."
    )


@dataclass
class SchedulerStats:
    """Live numbers for metrics and benchmarks."""

    steps: int = 0
    prefill_tokens: int = 0
    last_batch_size: int = 0
    #: The most rows one decode step has held: proof that requests really shared a batch.
    largest_batch_size: int = 0


@dataclass
class _ModelBatch:
    """The sequences of one loaded model that decode together, and their shared KV cache."""

    loaded: LoadedModel
    decoder: LeanDecoder | None = None
    kv: BatchKVCache | None = None
    rows: list[Sequence] = field(default_factory=list)

    def new_cache(self) -> BatchKVCache:
        # One row to start: rows double as sequences join, so a lone 7B stream holds one row, not four.
        return BatchKVCache.for_model(self.loaded.model, rows=1, max_columns=self.loaded.context_length + 1)


class Scheduler:
    """Owns the worker thread; ``submit`` is safe from any thread."""

    def __init__(
        self,
        *,
        max_active: int = 16,
        max_waiting: int = 64,
        prefill_chunk: int = 512,
        prefix_cache_bytes: int = 256 * 2**20,
        threads: int = 0,
        lean_decode: bool = True,
        deterministic: bool = False,
        budgets: MemoryBudgets | None = None,
    ) -> None:
        self.budgets = budgets if budgets is not None else MemoryBudgets(unlimited=True)
        self.threads = threads
        self.lean_decode = lean_decode
        #: Batch-invariant bf16 steps too (row by row): see ``forward.run.decode``.
        self.deterministic = deterministic
        # One lean step per model object, built on its first batch rather than on every batch (a batch
        # ends whenever its model goes idle); weak keys, so an evicted model takes its entry with it.
        self._decoders: weakref.WeakKeyDictionary[Any, LeanDecoder | None] = weakref.WeakKeyDictionary()
        self.max_active = max_active
        self.prefix_cache_bytes = prefix_cache_bytes
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.stats = SchedulerStats()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._batches: dict[int, _ModelBatch] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="peft-gateway-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._prefilling) + sum(len(batch.rows) for batch in self._batches.values())

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; 503 when the waiting queue is full rather than an unbounded backlog."""
        with self._cond:
            if self._closed:
                raise Overloaded("The engine is shutting down.")
            if self.active_count + len(self._waiting) >= self.max_active + self.max_waiting:
                raise Overloaded(
                    f"The server is at capacity ({self.active_count} running, {len(self._waiting)} "
                    "waiting); retry shortly.",
                    retry_after=1,
                )
            self._waiting.append(sequence)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        pending = [*self._waiting, *self._prefilling]
        for batch in self._batches.values():
            pending.extend(batch.rows)
        for sequence in pending:
            if not sequence.finished:
                sequence.fail(Overloaded("The engine shut down before this request finished."))

    def _run(self) -> None:
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._busy():
                        self._cond.wait()
                    if self._closed:
                        return
                    while self._waiting and self.active_count < self.max_active:
                        if not self._admit_memory(self._waiting[0]):
                            break
                        self._prefilling.append(self._waiting.popleft())
                self._prefill_some()
                for key, batch in list(self._batches.items()):
                    self._decode(batch)
                    if not batch.rows:
                        del self._batches[key]
                self._settle_kv()

    def _kv_projection(self, extra: Sequence | None = None) -> dict[str, int]:
        """Bytes per device that every KV cache may grow to, with ``extra`` admitted too.

        Batch caches are bounded by their rows and their longest row's prompt plus ``max_tokens``
        (``engines.kv_budget``); a prefilling prompt holds its own cache until it joins; each model with
        a prefix cache may fill it.
        """
        groups: dict[int, list[Sequence]] = {}
        prefilling = [*self._prefilling, *([extra] if extra is not None else [])]
        for sequence in prefilling:
            groups.setdefault(id(sequence.model.model), []).append(sequence)
        for batch in self._batches.values():
            groups.setdefault(id(batch.loaded.model), []).extend(batch.rows)
        totals: dict[str, int] = {}
        for key, sequences in groups.items():
            if not sequences:
                continue
            loaded = sequences[0].model
            per_token = kv_bytes_per_token(loaded.model)
            layers = int(getattr(loaded.model.config, "num_hidden_layers", 1) or 1)
            max_columns = loaded.context_length + 1
            longest = max(len(s.request.prompt_ids) + s.request.max_tokens + 1 for s in sequences)
            rows = len(sequences)
            existing = self._batches.get(key)
            if existing is not None and existing.kv is not None:  # capacities never shrink while in use
                longest = max(longest, existing.kv.column_capacity)
                rows = max(rows, existing.kv.row_capacity)
            size = batch_bound(per_token, layers, rows, min(longest, max_columns), max_columns)
            size += per_token * sum(len(s.request.prompt_ids) for s in sequences if s in prefilling)
            if self.prefix_cache_bytes > 0:
                size += self.prefix_cache_bytes
            totals[loaded.device] = totals.get(loaded.device, 0) + size
        return totals

    def _admit_memory(self, sequence: Sequence) -> bool:
        """Take the KV memory ``sequence`` may need; ``False`` (it waits) when others hold it now.

        A sequence that cannot fit even with nothing else running is failed at once (waiting would never
        end) with what it needs and what to change.
        """
        projected = self._kv_projection(sequence)
        device = sequence.model.device
        budget = self.budgets.for_device(device)
        if budget.try_set_kv(projected.get(device, 0)):
            return True
        if self.active_count == 0:
            self._waiting.popleft()
            sequence.fail(kv_too_large(sequence, projected.get(device, 0), budget))
        return False

    def _settle_kv(self) -> None:
        """Give back the KV memory of sequences that finished (the ledger only ever shrinks here)."""
        projected = self._kv_projection()
        for device in {s.model.device for s in self._waiting} | set(projected) | {"cpu"}:
            budget = self.budgets.for_device(device)
            if projected.get(device, 0) < budget.kv:
                budget.try_set_kv(projected.get(device, 0))

    def _busy(self) -> bool:
        return bool(self._prefilling) or any(batch.rows for batch in self._batches.values())

    def _prefill_some(self) -> None:
        """Spend at most one chunk of prompt tokens, oldest request first.

        Chunks are cut at fixed places in each prompt (every ``prefill_chunk`` tokens from its start),
        never where another prompt's tokens happened to use up the budget: a prompt's KV and first
        logits then come from the same forward passes whatever else is waiting, so its answer does not
        depend on it. A chunk that does not fit the budget left waits for the next round.
        """
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            sequence = self._prefilling[0]
            if sequence.cancelled:
                self._prefilling.popleft()
                sequence.finished = True
                continue
            try:
                if sequence.cache is None and self._start_from_prefix(sequence):
                    pass  # the whole prompt was cached, its logits too: on to its first token
                else:
                    size = self._chunk_size(sequence)
                    if size > budget and budget < self.prefill_chunk:
                        return
                    budget -= self._prefill_chunk(sequence, size)
            except Exception as exc:  # a failing forward ends one request, not the engine thread
                log.exception("prefill failed for %s", sequence.request.request_id)
                self._prefilling.popleft()
                sequence.fail(exc)
                continue
            if sequence.logits is not None:  # prompt done: first token, then join the batch
                self._prefilling.popleft()
                try:
                    if sequence.request.prompt_logprobs is not None:
                        sequence.emit_prompt_logprobs()
                    if sequence.request.max_tokens <= 0:
                        sequence.finish_without_generating()
                        continue
                    sequence.step()
                    if not sequence.finished:
                        self._join(sequence)
                except Exception as exc:  # one request's failure must never end the engine thread
                    log.exception("first step failed for %s", sequence.request.request_id)
                    sequence.fail(exc)

    def _start_from_prefix(self, sequence: Sequence) -> bool:
        """Give ``sequence`` its prompt cache, from the longest cached prefix; ``True`` when it is whole.

        A prompt cached whole (a repeated prompt: retries, several clients sending the same request,
        ``n`` choices) needs no forward pass at all: the entry keeps the logits its prefill ended on, so
        the first token is the one the cold prefill picked, and the row joins its batch at once. A
        shorter prefix is reused up to a chunk boundary (``PrefixCache.lookup``), so the rest of the
        prompt goes through the chunks a cold prefill computes.
        """
        from transformers import DynamicCache

        prompt = sequence.request.prompt_ids
        prefixes = self._prefix_cache(sequence.model)
        # A scored prompt needs every position's logits, which a cached prefix no longer has.
        scored = sequence.request.prompt_logprobs is not None
        hit = prefixes.lookup(prompt, self.prefill_chunk) if prefixes is not None and not scored else None
        if hit is None:
            sequence.prefilled = 0
            sequence.cache = DynamicCache()
            return False
        sequence.prefilled = hit.length
        if hit.logits is not None:
            # Copied into the batch when it joins, from the entry itself.
            sequence.cache = PrefixView(hit.layers, hit.length)
            sequence.logits = hit.logits
            return True
        sequence.cache = cache_from_prefix(hit.layers, hit.length)
        return False

    def _chunk_size(self, sequence: Sequence) -> int:
        """The prompt tokens of ``sequence``'s next prefill chunk: up to the next fixed boundary."""
        size = self.prefill_chunk
        if sequence.request.prompt_logprobs is not None:
            vocab = int(sequence.model.model.config.get_text_config().vocab_size)
            size = scored_chunk_tokens(vocab, size)
        start = sequence.prefilled
        return min(len(sequence.request.prompt_ids), (start // size + 1) * size) - start

    def _prefill_chunk(self, sequence: Sequence, size: int) -> int:
        import torch

        model = sequence.model.model
        prompt = sequence.request.prompt_ids
        prefixes = self._prefix_cache(sequence.model)
        scored = sequence.request.prompt_logprobs is not None
        start = sequence.prefilled
        chunk = prompt[start : start + size]
        device = sequence.model.device
        ids = torch.tensor([chunk], dtype=torch.long, device=device)
        # The last position as an index tensor, not ``logits_to_keep=1``: that slice keeps the prompt's
        # stride, so torch's matmul cannot fold it into one matrix product with weights that do not
        # require grad and copies the whole transposed lm_head instead, a large share of a bf16 prefill
        # (figures in bench/README.md).
        # A scored prompt keeps all positions (``0``).
        last = 0 if scored else torch.tensor([len(chunk) - 1], device=device)
        output = forward.prefill([sequence], model, ids, sequence.cache, last)
        if scored:
            targets = list(prompt[start + 1 : start + len(chunk) + 1])
            top = sequence.request.prompt_logprobs or 0
            sequence.add_prompt_scores(score_rows(output.logits[0], targets, top), start + 1)
        sequence.prefilled += len(chunk)
        self.stats.prefill_tokens += len(chunk)
        if sequence.prefilled >= len(prompt):
            sequence.logits = output.logits[0, -1]
            # A scored prompt went through smaller chunks: its KV is not what a plain prefill computes.
            if prefixes is not None and not scored:
                prefixes.store(prompt, sequence.cache, sequence.logits, self.prefill_chunk)
        return len(chunk)

    def _prefix_cache(self, loaded: LoadedModel) -> PrefixCache | None:
        if self.prefix_cache_bytes <= 0:
            return None
        if loaded.prefix_cache is None:
            loaded.prefix_cache = PrefixCache(self.prefix_cache_bytes)
        cache: PrefixCache = loaded.prefix_cache
        return cache

    def _join(self, sequence: Sequence) -> None:
        key = id(sequence.model.model)
        batch = self._batches.get(key)
        if batch is None:
            model = sequence.model.model
            batch = self._batches[key] = _ModelBatch(loaded=sequence.model, decoder=self._decoder_for(model))
        if batch.kv is None:
            batch.kv = batch.new_cache()
        batch.kv.add_row(sequence.cache)
        sequence.cache = None
        batch.rows.append(sequence)

    def _drop_finished(self, batch: _ModelBatch) -> None:
        assert batch.kv is not None
        for row in range(len(batch.rows) - 1, -1, -1):
            sequence = batch.rows[row]
            if sequence.cancelled:
                sequence.finished = True
            if sequence.finished:
                batch.kv.remove_row(row)
                batch.rows[row] = batch.rows[-1]
                batch.rows.pop()
        if not batch.rows:
            batch.kv = None  # free the buffers; the next arrival allocates a fresh, small cache

    def _decode(self, batch: _ModelBatch) -> None:
        import torch

        self._drop_finished(batch)
        if not batch.rows or batch.kv is None:
            return
        kv = batch.kv
        try:
            kv.reserve(1)
            positions = kv.position_ids()
            ids = torch.tensor([[s.next_input()] for s in batch.rows], dtype=torch.long, device=kv.device)
            logits = forward.decode(
                batch.rows,
                batch.loaded.model,
                batch.decoder,
                kv,
                ids,
                positions,
                deterministic=self.deterministic,
            )
            kv.advance()
        except Exception as exc:
            log.exception("decode step failed for a batch of %d", len(batch.rows))
            for sequence in batch.rows:
                sequence.fail(exc)
            self._drop_finished(batch)
            return
        for row, sequence in enumerate(batch.rows):
            sequence.logits = logits[row]
            try:
                sequence.step()
            except Exception as exc:
                log.exception("sampling failed for %s", sequence.request.request_id)
                sequence.fail(exc)
        self.stats.steps += 1
        self.stats.last_batch_size = len(batch.rows)
        self.stats.largest_batch_size = max(self.stats.largest_batch_size, len(batch.rows))
        self._drop_finished(batch)

    def _decoder_for(self, model: Any) -> LeanDecoder | None:
        if not self.lean_decode:
            return None
        if model not in self._decoders:
            self._decoders[model] = LeanDecoder.for_model(model)
        return self._decoders[model]
