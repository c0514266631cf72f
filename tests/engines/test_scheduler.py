"""Continuous batching gives every request exactly what it would get alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.engine import Engine, EngineLimits
from engines.forward.lean import LeanDecoder
from engines.prompts import encode_text
from engines.sampling import SamplingParams
from tests.conftest import TinyModels

GREEDY = SamplingParams(temperature=0)
#: Greedy, with each token's bytes in its event: answers compared token by token, never cut mid-character.
TRACED = SamplingParams(temperature=0, logprobs=True)
PROMPTS = ["a", "hello there, general", "xyz" * 9, "The quick brown fox jumps over", "0123456789" * 3]
#: Answers as their tokens' bytes, one list per request.
Tokens = list[list[tuple[int, ...]]]
#: A context no test's stream reaches: a row running to it (``ignore_eos``) outlasts every other row.
LONG_CONTEXT = 8192


def tiny_catalog(tiny_models: TinyModels, context_length: int = 256) -> Catalog:
    return Catalog(
        bases=(
            BaseSpec(
                name="tiny", source=str(tiny_models.base), dtype="float32", context_length=context_length
            ),
        ),
        adapters=(AdapterSpec(alias="lora", source=str(tiny_models.adapter), base="tiny"),),
        policy=AdapterPolicy(adapter_dirs=(tiny_models.adapter_dirs,), base_match="warn"),
    )


@pytest.fixture
def engine(tiny_models: TinyModels) -> Iterator[Engine]:
    engine = Engine(tiny_catalog(tiny_models), EngineLimits(max_batch=8, max_waiting=16))
    yield engine
    engine.close()


@pytest.fixture
def long_engine(tiny_models: TinyModels) -> Iterator[Engine]:
    engine = Engine(tiny_catalog(tiny_models, LONG_CONTEXT), EngineLimits(max_batch=8, max_waiting=16))
    yield engine
    engine.close()


async def generate(
    engine: Engine, model: str, prompt: str, sampling: SamplingParams = GREEDY, n: int = 24
) -> str:
    lease = await engine.acquire(model)
    try:
        request = engine.text_request(lease, prompt, max_tokens=n, sampling=sampling)
        text = ""
        async for event in engine.generate(lease, request):
            assert event.error is None
            text += event.text
        return text
    finally:
        lease.release()


async def greedy_tokens(engine: Engine, model: str, prompt: str, n: int) -> list[tuple[int, ...]]:
    """Exactly ``n`` greedy tokens (``ignore_eos``), each as its bytes."""
    lease = await engine.acquire(model)
    try:
        request = engine.text_request(lease, prompt, max_tokens=n, sampling=TRACED, ignore_eos=True)
        tokens = []
        async for event in engine.generate(lease, request):
            assert event.error is None
            tokens.extend(entry.bytes for entry in event.logprobs)
        return tokens
    finally:
        lease.release()


class Endless:
    """A greedy stream that runs until ``stop`` (``ignore_eos``, up to the context): it outlasts any row
    that starts after it, by construction, and its tokens are kept as bytes for comparison."""

    def __init__(self, engine: Engine, model: str, prompt: str) -> None:
        self.engine = engine
        self.tokens: list[tuple[int, ...]] = []
        self.finished = False  # it ran out (or failed) by itself before it was stopped
        self.task = asyncio.create_task(self._run(engine, model, prompt))

    async def _run(self, engine: Engine, model: str, prompt: str) -> None:
        lease = await engine.acquire(model)
        try:
            request = engine.text_request(lease, prompt, max_tokens=None, sampling=TRACED, ignore_eos=True)
            async with contextlib.aclosing(engine.generate(lease, request)) as events:
                async for event in events:
                    self.tokens.extend(entry.bytes for entry in event.logprobs)
                    self.finished = event.done
        finally:
            lease.release()

    async def until(self, count: int) -> None:
        """Until the stream has ``count`` tokens (it is in its batch and decoding)."""
        await until(lambda: len(self.tokens) >= count or self.task.done())
        assert len(self.tokens) >= count and not self.finished

    async def stop(self) -> list[tuple[int, ...]]:
        assert not self.finished and not self.task.done(), "the endless stream ended by itself"
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.tokens

    @staticmethod
    async def stop_all(streams: list[Endless]) -> list[list[tuple[int, ...]]]:
        """Stop every stream, then wait for the engine to drop their rows (before the loop closes)."""
        tokens = [await stream.stop() for stream in streams]
        await until(lambda: all(stream.engine.scheduler.active_count == 0 for stream in streams))
        return tokens


async def until(condition: Any, within: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail after a generous ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def admitted_together(engine: Engine, count: int) -> AsyncIterator[None]:
    """Requests submitted inside wait until ``count`` are queued, then join one iteration together.

    The engine thread takes the scheduler's condition lock to admit what waits; holding it (a
    re-entrant lock, so submitting from this thread still works) keeps every row queued until the last
    one is. They are then admitted, prefilled (short prompts: one chunk) and joined in one iteration.
    """
    scheduler = engine.scheduler
    waiting = scheduler.queue_depth
    with scheduler._cond:
        yield
        await until(lambda: scheduler.queue_depth >= waiting + count)


def test_batched_greedy_output_equals_one_at_a_time(engine: Engine) -> None:
    async def scenario() -> None:
        models = ["tiny", "tiny+lora", "tiny+other-base-lora"]
        jobs = [(models[i % 3], prompt) for i, prompt in enumerate(PROMPTS * 2)]
        alone = [await generate(engine, m, p) for m, p in jobs]
        assert engine.scheduler.stats.largest_batch_size == 1
        engine.scheduler.max_active = len(jobs)  # all ten rows admitted at once
        async with admitted_together(engine, len(jobs)):
            tasks = [asyncio.create_task(generate(engine, m, p)) for m, p in jobs]
        assert list(await asyncio.gather(*tasks)) == alone
        # One batch per model: every row of the busiest model (4 of the 10) decoded in the same steps.
        assert engine.scheduler.stats.largest_batch_size == max(Counter(m for m, _ in jobs).values())

    asyncio.run(scenario())


def test_requests_joining_mid_stream_get_their_own_answers(long_engine: Engine) -> None:
    engine = long_engine

    async def scenario() -> None:
        alone = [await greedy_tokens(engine, "tiny", p, 40) for p in PROMPTS]
        first = [Endless(engine, "tiny", p) for p in PROMPTS[:2]]
        for stream in first:
            await stream.until(1)  # mid-stream: decoding in its batch
        async with admitted_together(engine, len(PROMPTS[2:])):
            later = [asyncio.create_task(greedy_tokens(engine, "tiny", p, 40)) for p in PROMPTS[2:]]
        joined = list(await asyncio.gather(*later))
        for stream in first:  # still running beside every later row, from before its join to its end
            await stream.until(40)
        early = [tokens[:40] for tokens in await Endless.stop_all(first)]
        assert [*early, *joined] == alone
        assert engine.scheduler.stats.largest_batch_size == len(PROMPTS)

    asyncio.run(scenario())


def test_seeded_sampling_repeats_inside_a_batch(engine: Engine) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)

    async def scenario() -> None:
        alone = await generate(engine, "tiny", "seed me", seeded)
        noise = [generate(engine, "tiny", p, SamplingParams(temperature=1.0)) for p in PROMPTS]
        results = await asyncio.gather(generate(engine, "tiny", "seed me", seeded), *noise)
        assert results[0] == alone
        other = await generate(engine, "tiny", "seed me", SamplingParams(temperature=1.0, seed=99))
        assert other != alone

    asyncio.run(scenario())


def test_cancelled_request_leaves_batch_without_disturbing_others(engine: Engine) -> None:
    async def scenario() -> None:
        alone = [await generate(engine, "tiny", p, n=40) for p in PROMPTS[:3]]
        lease = await engine.acquire("tiny")
        request = engine.text_request(lease, "to be cancelled", max_tokens=200, sampling=GREEDY)
        tasks = [asyncio.create_task(generate(engine, "tiny", p, n=40)) for p in PROMPTS[:3]]
        stream = engine.generate(lease, request)
        async with contextlib.aclosing(stream):
            async for _event in stream:
                break  # client goes away after the first event
        lease.release()
        assert list(await asyncio.gather(*tasks)) == alone
        for _ in range(100):
            if engine.scheduler.active_count == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.scheduler.active_count == 0

    asyncio.run(scenario())


def test_long_prompt_is_prefilled_in_chunks(tiny_models: TinyModels) -> None:
    catalog = Catalog(
        bases=(BaseSpec(name="tiny", source=str(tiny_models.base), dtype="float32", context_length=512),)
    )
    engine = Engine(catalog, EngineLimits())
    engine.scheduler.prefill_chunk = 64
    try:

        async def scenario() -> None:
            chunked = await generate(engine, "tiny", "long " * 60, n=8)
            engine.scheduler.prefill_chunk = 4096
            whole = await generate(engine, "tiny", "long " * 60, n=8)
            assert chunked == whole

        asyncio.run(scenario())
    finally:
        engine.close()


def test_prefix_reuse_never_changes_an_answer_and_is_per_model(engine: Engine) -> None:
    system = "You are a terse assistant who answers in one line. " * 3
    # Prefixes are reused in whole prefill chunks: small ones, so the shared system prompt spans several.
    engine.scheduler.prefill_chunk = 32

    async def scenario() -> None:
        engine.scheduler.prefix_cache_bytes = 0
        cold = [
            await generate(engine, m, system + q, n=16) for m in ("tiny", "tiny+lora") for q in ("A?", "B?")
        ]
        engine.scheduler.prefix_cache_bytes = 64 * 2**20
        warm = [
            await generate(engine, m, system + q, n=16) for m in ("tiny", "tiny+lora") for q in ("A?", "B?")
        ]
        assert warm == cold
        base = (await engine.acquire("tiny")).loaded
        variant = (await engine.acquire("tiny+lora")).loaded
        assert base.prefix_cache is not variant.prefix_cache
        assert base.prefix_cache.hits >= 1 and variant.prefix_cache.hits >= 1
        assert base.prefix_cache.reused_tokens >= len(system) - engine.scheduler.prefill_chunk

    asyncio.run(scenario())


def test_a_repeated_prompt_joins_the_batch_with_its_last_token_instead_of_a_prefill(
    long_engine: Engine,
) -> None:
    """With all but its last token cached, a prompt runs no forward of its own; its answer is unchanged."""
    engine = long_engine
    prompt = "A prompt long enough to be kept whole in the prefix cache. " * 2

    async def scenario() -> None:
        engine.scheduler.prefix_cache_bytes = 0
        cold = [await generate(engine, model, prompt, n=16) for model in ("tiny", "tiny+lora")]
        engine.scheduler.prefix_cache_bytes = 64 * 2**20
        assert [await generate(engine, model, prompt, n=16) for model in ("tiny", "tiny+lora")] == cold
        prefilled = engine.scheduler.stats.prefill_tokens
        # Repeats, alone and four at once beside a row that is mid-answer: no prompt token prefilled.
        assert [await generate(engine, model, prompt, n=16) for model in ("tiny", "tiny+lora")] == cold
        lease = await engine.acquire("tiny")
        other_tokens = len(encode_text(lease.loaded.tokenizer, PROMPTS[1], add_special_tokens=True))
        lease.release()
        other = Endless(engine, "tiny", PROMPTS[1])
        await other.until(1)  # mid-answer, and it stays so until stopped
        async with admitted_together(engine, 4):
            repeats = [asyncio.create_task(generate(engine, "tiny", prompt, n=16)) for _ in range(4)]
        assert list(await asyncio.gather(*repeats)) == [cold[0]] * 4
        await Endless.stop_all([other])
        assert engine.scheduler.stats.largest_batch_size == 5  # the four repeats beside the other row
        assert engine.scheduler.stats.prefill_tokens == prefilled + other_tokens

    asyncio.run(scenario())


def test_a_failing_first_step_ends_one_request_not_the_engine(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines.sampling import Sampler

    original = Sampler.choose
    calls = {"n": 0}

    def explode_once(self: Sampler, logits: object, allowed: object = None) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("sampler broke")
        return original(self, logits, allowed)

    monkeypatch.setattr(Sampler, "choose", explode_once)

    async def scenario() -> None:
        lease = await engine.acquire("tiny")
        request = engine.text_request(lease, "boom", max_tokens=4, sampling=GREEDY)
        events = [event async for event in engine.generate(lease, request)]
        lease.release()
        assert events[-1].error is not None and "sampler broke" in events[-1].error.message
        assert await generate(engine, "tiny", "still alive", n=4)
        assert engine.scheduler.alive

    asyncio.run(scenario())


def test_lean_decode_gives_the_answers_of_the_transformers_forward(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    lean_steps = []
    real_step = LeanDecoder.step

    def counting_step(self: LeanDecoder, *args: Any) -> Any:
        lean_steps.append(len(args[0]))
        return real_step(self, *args)

    monkeypatch.setattr(LeanDecoder, "step", counting_step)

    def answers(lean: bool) -> list[str]:
        engine = Engine(tiny_catalog(tiny_models), EngineLimits(max_batch=8, lean_decode=lean))
        try:

            async def scenario() -> list[str]:
                jobs = [("tiny+lora" if i % 2 else "tiny", p) for i, p in enumerate(PROMPTS)]
                return list(await asyncio.gather(*(generate(engine, m, p, n=40) for m, p in jobs)))

            return asyncio.run(scenario())
        finally:
            engine.close()

    with_lean = answers(lean=True)
    assert max(lean_steps) > 1  # several rows went through the lean step in one batch
    steps_taken = len(lean_steps)
    assert with_lean == answers(lean=False)
    assert len(lean_steps) == steps_taken


def test_the_lean_step_is_built_once_per_model_not_per_batch(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    real_for_model = LeanDecoder.for_model.__func__  # type: ignore[attr-defined]

    def counting_for_model(cls: type[LeanDecoder], model: Any) -> LeanDecoder | None:
        built.append(model)
        return real_for_model(cls, model)  # type: ignore[no-any-return]

    monkeypatch.setattr(LeanDecoder, "for_model", classmethod(counting_for_model))

    async def scenario() -> None:
        for prompt in PROMPTS[:3]:  # one after another: each request gets a new batch
            await generate(engine, "tiny", prompt)

    asyncio.run(scenario())
    assert len(built) == 1


@pytest.mark.parametrize("lean", [True, False], ids=["lean step", "transformers forward"])
def test_no_step_reads_a_kv_cell_before_it_is_written(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    """KV buffers start uninitialised: poisoned with NaN here, any read of an unwritten cell (padding
    after rows join with longer prompts, growth, rows leaving) would turn an answer into garbage."""
    import torch

    from engines.forward.kvcache import BatchKVCache

    def alone_then_together() -> tuple[Tokens, Tokens]:
        catalog = tiny_catalog(tiny_models, LONG_CONTEXT)
        engine = Engine(catalog, EngineLimits(max_batch=8, lean_decode=lean))
        try:

            async def scenario() -> tuple[Tokens, Tokens]:
                jobs = [("tiny+lora" if i % 2 else "tiny", p) for i, p in enumerate(PROMPTS)]
                alone = [await greedy_tokens(engine, m, p, 40) for m, p in jobs]
                # Short prompts first, longer ones joining mid-stream: the batch shifts right and grows.
                first = [Endless(engine, m, p) for m, p in jobs[:2]]
                for stream in first:
                    await stream.until(1)
                async with admitted_together(engine, len(jobs[2:])):
                    later = [asyncio.create_task(greedy_tokens(engine, m, p, 40)) for m, p in jobs[2:]]
                joined = list(await asyncio.gather(*later))
                for stream in first:
                    await stream.until(40)
                early = [tokens[:40] for tokens in await Endless.stop_all(first)]
                # Both rows of each model's batch were running when the later rows joined it.
                assert engine.scheduler.stats.largest_batch_size == 3  # "tiny": one early row, two later
                return alone, [*early, *joined]

            return asyncio.run(scenario())
        finally:
            engine.close()

    clean_alone, _ = alone_then_together()
    real_empty = BatchKVCache._empty

    def poisoned(self: BatchKVCache, rows: int, columns: int) -> torch.Tensor:
        return real_empty(self, rows, columns).fill_(float("nan"))

    monkeypatch.setattr(BatchKVCache, "_empty", poisoned)
    alone, together = alone_then_together()
    assert alone == clean_alone
    assert together == clean_alone
