"""Unmerged multi-adapter serving gives the merged answers, in shared batches, at adapter-sized cost."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.engine import Engine, EngineLimits
from engines.pool import MERGED_SUFFIX
from tests.conftest import TinyModels
from tests.engines.test_scheduler import PROMPTS, generate

MODELS = ["tiny", "tiny+lora", "tiny+other-base-lora"]


def make_engine(models: TinyModels, mode: str) -> Engine:
    catalog = Catalog(
        bases=(
            BaseSpec(
                name="tiny", source=str(models.base), dtype="float32", context_length=256, adapter_mode=mode
            ),
        ),
        adapters=(AdapterSpec(alias="lora", source=str(models.adapter), base="tiny"),),
        policy=AdapterPolicy(adapter_dirs=(models.adapter_dirs,), base_match="warn"),
    )
    return Engine(catalog, EngineLimits(max_batch=8, prefix_cache_bytes=0))


@pytest.fixture(scope="module")
def merged_answers(tiny_models: TinyModels) -> dict[tuple[str, str], str]:
    engine = make_engine(tiny_models, "merge")
    try:

        async def collect() -> dict[tuple[str, str], str]:
            return {(m, p): await generate(engine, m, p) for m in MODELS for p in PROMPTS[:3]}

        return asyncio.run(collect())
    finally:
        engine.close()


@pytest.fixture
def multi(tiny_models: TinyModels) -> Iterator[Engine]:
    engine = make_engine(tiny_models, "multi")
    yield engine
    engine.close()


def test_unmerged_adapters_answer_like_merged_ones_in_one_mixed_batch(
    multi: Engine, merged_answers: dict[tuple[str, str], str]
) -> None:
    async def scenario() -> None:
        jobs = list(merged_answers)
        together = await asyncio.gather(*(generate(multi, m, p) for m, p in jobs))
        assert dict(zip(jobs, together, strict=True)) == merged_answers
        alone = [await generate(multi, m, p) for m, p in jobs]
        assert alone == list(together)

    asyncio.run(scenario())


def test_unmerged_adapter_costs_only_its_own_weights(multi: Engine) -> None:
    async def scenario() -> None:
        base = await multi.acquire("tiny")
        variant = await multi.acquire("tiny+lora")
        assert variant.loaded.model is base.loaded.model  # no copy of the base
        assert 0 < variant.loaded.nbytes < base.loaded.nbytes / 10
        assert variant.loaded.adapter_slot > 0
        base.release()
        variant.release()

    asyncio.run(scenario())


def test_evicted_unmerged_adapter_frees_its_slot_and_base_is_unchanged(
    multi: Engine, merged_answers: dict[tuple[str, str], str]
) -> None:
    async def scenario() -> None:
        await generate(multi, "tiny+lora", PROMPTS[0])
        key = next(e.key for e in multi.pool.entries() if e.base_key)
        assert multi.pool.unload(key)
        registry = multi.pool.entries()[0].loaded.multilora
        assert registry.adapters == 0
        assert await generate(multi, "tiny", PROMPTS[0]) == merged_answers[("tiny", PROMPTS[0])]
        assert await generate(multi, "tiny+lora", PROMPTS[1]) == merged_answers[("tiny+lora", PROMPTS[1])]

    asyncio.run(scenario())


def test_auto_mode_promotes_a_busy_adapter_to_a_merged_variant(
    tiny_models: TinyModels, merged_answers: dict[tuple[str, str], str]
) -> None:
    engine = make_engine(tiny_models, "auto")
    engine.pool.merge_after = 3
    try:

        async def scenario() -> None:
            answers = [await generate(engine, "tiny+lora", PROMPTS[0]) for _ in range(3)]
            for _ in range(200):
                if any(e.key.endswith(MERGED_SUFFIX) for e in engine.pool.entries()):
                    break
                await asyncio.sleep(0.02)
            merged = [e for e in engine.pool.entries() if e.key.endswith(MERGED_SUFFIX)]
            assert len(merged) == 1 and merged[0].loaded.multilora is None
            lease = await engine.acquire("tiny+lora")
            assert lease.loaded is merged[0].loaded
            lease.release()
            answers.append(await generate(engine, "tiny+lora", PROMPTS[0]))
            assert set(answers) == {merged_answers[("tiny+lora", PROMPTS[0])]}

        asyncio.run(scenario())
    finally:
        engine.close()


def test_unsupported_adapter_falls_back_to_merging(
    tiny_models: TinyModels, merged_answers: dict[tuple[str, str], str], tmp_path: Path
) -> None:
    from engines.forward.multilora import unsupported_reason

    assert unsupported_reason({"modules_to_save": ["lm_head"]})
    assert unsupported_reason({"bias": "all"})
    assert unsupported_reason({"bias": "none"}) is None
    # The tiny adapter declaring trained biases (Llama has none, so its weights are unchanged): the
    # unmerged path cannot serve it, so a "multi" base serves it merged, with the merged answer.
    biased = tmp_path / "biased"
    shutil.copytree(tiny_models.adapter, biased)
    config = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    engine = make_engine(tiny_models, "multi")
    engine.catalog = replace(
        engine.catalog,
        adapters=(*engine.catalog.adapters, AdapterSpec(alias="biased", source=str(biased), base="tiny")),
    )
    try:

        async def scenario() -> None:
            want = merged_answers[("tiny+lora", PROMPTS[0])]
            assert await generate(engine, "tiny+biased", PROMPTS[0]) == want
            assert await generate(engine, "tiny+lora", PROMPTS[0]) == want
            base = await engine.acquire("tiny")
            served = {}
            for name in ("tiny+biased", "tiny+lora"):
                lease = await engine.acquire(name)
                served[name] = (lease.loaded.serving, lease.loaded.model is base.loaded.model)
                lease.release()
            base.release()
            assert served == {"tiny+biased": ("merged", False), "tiny+lora": ("unmerged", True)}

        asyncio.run(scenario())
    finally:
        engine.close()


def test_prefix_cache_is_never_shared_between_unmerged_adapters_of_one_base(multi: Engine) -> None:
    """Unmerged adapters run on the base's own module tree, so a shared KV entry would be easy to hit."""
    prompt = "A system prompt long enough to be cached as a prefix. " * 2

    async def scenario() -> None:
        cold = [await generate(multi, model, prompt) for model in MODELS]  # the fixture has reuse off
        assert len(set(cold)) == len(MODELS)
        multi.scheduler.prefix_cache_bytes = 64 * 2**20
        for _ in range(2):  # the second round reuses prefixes: only ever each model's own
            assert [await generate(multi, model, prompt) for model in MODELS] == cold
        caches = []
        for model in MODELS:
            lease = await multi.acquire(model)
            caches.append(lease.loaded.prefix_cache)
            lease.release()
        assert len({id(cache) for cache in caches}) == len(MODELS)
        assert all(cache.hits >= 1 for cache in caches)

    asyncio.run(scenario())
