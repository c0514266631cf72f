"""Greedy answers are reproducible: the same request gives the same tokens, and the same logprobs bit for
bit, whatever the prefix cache and the batch hold.

Random-weight models have near-ties everywhere, so a different rounding anywhere (another kernel for
another row count, a prefill chunk cut elsewhere, the last prompt token computed by the decode step)
shows up in the logprobs at once, and soon in the text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.engine import Engine, EngineLimits
from engines.prefix_cache import PrefixCache
from engines.sampling import SamplingParams
from tests.conftest import TinyModels

pytestmark = pytest.mark.slow

WITH_LOGPROBS = SamplingParams(temperature=0, logprobs=True, top_logprobs=3)
SYSTEM = "System: you are a careful assistant who answers briefly. "
#: Short and long prompts; the long ones share a prefix that spans several prefill chunks.
PROMPTS = [
    *(f"Question {i}: what about the number {i}? " * (1 + i % 3) for i in range(4)),
    *(SYSTEM * 2 + f"User {i} asks about item {i}. " * (1 + i) for i in range(4)),
]
CHUNK = 32
#: (dtype, quantization, deterministic): float32 and int8 are batch-invariant by default.
PRECISIONS = [("float32", "none", False), ("float32", "int8", False), ("bfloat16", "none", True)]

Answer = list[tuple[str, tuple[float, ...]]]


def catalog(tiny_models: TinyModels, dtype: str, quantization: str) -> Catalog:
    base = BaseSpec(
        name="tiny",
        source=str(tiny_models.base),
        dtype=dtype,
        quantization=quantization,
        context_length=512,
        adapter_mode="multi",
    )
    return Catalog(
        bases=(base,),
        adapters=(AdapterSpec(alias="lora", source=str(tiny_models.adapter), base="tiny"),),
        policy=AdapterPolicy(base_match="warn"),
    )


@pytest.fixture
def make_engine(tiny_models: TinyModels) -> Iterator[Any]:
    engines: list[Engine] = []

    def make(dtype: str, quantization: str, *, prefix_cache: bool, deterministic: bool = False) -> Engine:
        limits = EngineLimits(
            max_batch=len(PROMPTS),
            max_waiting=64,
            prefill_chunk=CHUNK,
            prefix_cache_bytes=64 * 2**20 if prefix_cache else 0,
            deterministic=deterministic,
        )
        engine = Engine(catalog(tiny_models, dtype, quantization), limits)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


async def answer(engine: Engine, model: str, prompt: str, n: int = 12) -> Answer:
    lease = await engine.acquire(model)
    try:
        request = engine.text_request(lease, prompt, max_tokens=n, sampling=WITH_LOGPROBS)
        events = [event async for event in engine.generate(lease, request)]
    finally:
        lease.release()
    assert all(event.error is None for event in events)
    return [(event.text, tuple(entry.logprob for entry in event.logprobs)) for event in events]


def one_at_a_time(engine: Engine, jobs: list[tuple[str, str]]) -> list[Answer]:
    async def run() -> list[Answer]:
        return [await answer(engine, model, prompt) for model, prompt in jobs]

    return asyncio.run(run())


def jobs_for(models: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(models[i % len(models)], prompt) for i, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize(("dtype", "quantization", "deterministic"), PRECISIONS)
def test_a_prompt_answers_from_the_prefix_cache_as_it_does_cold(
    make_engine: Any, dtype: str, quantization: str, deterministic: bool
) -> None:
    """Whole repeated prompts (their logits kept) and prompts sharing a cached prefix (reused in whole
    chunks) give the cold answer, in every dtype; bf16 too without ``deterministic``."""
    jobs = jobs_for(("tiny", "tiny+lora"))
    cold = one_at_a_time(make_engine(dtype, quantization, prefix_cache=False), jobs)
    warm_engine = make_engine(dtype, quantization, prefix_cache=True)
    first = one_at_a_time(warm_engine, jobs)  # the long prompts find each other's shared prefix
    again = one_at_a_time(warm_engine, jobs)  # every prompt cached whole
    assert first == cold
    assert again == cold
    prefill_before = warm_engine.scheduler.stats.prefill_tokens
    assert one_at_a_time(warm_engine, jobs) == cold
    assert warm_engine.scheduler.stats.prefill_tokens == prefill_before  # whole hits: no forward at all


@pytest.mark.parametrize(("dtype", "quantization", "deterministic"), PRECISIONS)
def test_a_row_answers_the_same_alone_and_in_a_full_batch(
    make_engine: Any, dtype: str, quantization: str, deterministic: bool
) -> None:
    """Eight different prompts, base and adapter rows mixed: each alone, then all eight in one batch."""
    engine = make_engine(dtype, quantization, prefix_cache=False, deterministic=deterministic)
    jobs = jobs_for(("tiny", "tiny+lora"))
    alone = one_at_a_time(engine, jobs)
    assert engine.scheduler.stats.largest_batch_size == 1

    async def together() -> list[Answer]:
        return list(await asyncio.gather(*(answer(engine, model, prompt, n=48) for model, prompt in jobs)))

    batched = asyncio.run(together())
    assert engine.scheduler.stats.largest_batch_size == len(jobs)  # they really shared steps
    assert [got[: len(want)] for got, want in zip(batched, alone, strict=True)] == alone


class _Layer:
    def __init__(self, tokens: int) -> None:
        self.keys = torch.arange(float(tokens)).view(1, 1, tokens, 1)
        self.values = -self.keys


class _Cache:
    def __init__(self, tokens: int) -> None:
        self.layers = [_Layer(tokens)]


def test_the_prefix_cache_reuses_whole_chunks_and_whole_prompts_with_their_logits() -> None:
    cache = PrefixCache(2**20)
    short = tuple(range(40))
    logits = torch.tensor([1.0, 2.0])
    cache.store(short, _Cache(40), logits, chunk=32)
    partial = cache.lookup((*short, 99, 100), chunk=32)
    assert partial is not None and (partial.length, partial.logits) == (32, None)  # a chunk boundary
    whole = cache.lookup(short, chunk=32)
    assert whole is not None and whole.length == 40 and torch.equal(whole.logits, logits)
    assert cache.lookup(short, chunk=64) is None  # computed in other chunks: not what a cold prefill gives
    longer = (*short, *range(100, 130))
    cache.store(longer, _Cache(70), torch.tensor([3.0, 4.0]), chunk=32)
    assert len(cache) == 1  # the shorter entry is replaced, its logits kept
    kept = cache.lookup(short, chunk=32)
    assert kept is not None and kept.length == 40 and torch.equal(kept.logits, logits)
    assert kept.logits is not logits  # a copy: sampling may change its own in place
