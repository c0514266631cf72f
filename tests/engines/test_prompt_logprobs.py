"""Prompt scoring (``echo`` + ``logprobs``) gives what a plain transformers forward gives, chunked or not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.engine import Engine, EngineLimits
from engines.generation import GenerationEvent
from engines.prompt_logprobs import score_rows, scored_chunk_tokens
from engines.prompts import token_bytes
from engines.sampling import SamplingParams
from tests.conftest import TinyModels

PROMPT = "The quick brown fox jumps over the lazy dog"


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
    # A small prefill chunk, so that a prompt is scored across several chunks; prefix cache on, so a
    # repeated prompt would find a cached prefix (which has no logits) if scoring did not skip it.
    return Engine(catalog, EngineLimits(max_batch=4, prefill_chunk=5))


@pytest.fixture(scope="module", params=["merge", "multi"])
def engine(request: pytest.FixtureRequest, tiny_models: TinyModels) -> Iterator[Engine]:
    engine = make_engine(tiny_models, request.param)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_models: TinyModels) -> dict[str, tuple[list[int], list[float], list[int]]]:
    """Per model: the prompt's ids, each token's logprob given those before, and the greedy next ids."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.base)
    ids = tokenizer(PROMPT)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_models.base, dtype=torch.float32)
    out: dict[str, tuple[list[int], list[float], list[int]]] = {}
    with torch.inference_mode():
        for name in ("tiny", "tiny+lora"):
            model: Any = base
            if name == "tiny+lora":
                model = PeftModel.from_pretrained(base, tiny_models.adapter)
            rows = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            chosen = rows[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            out[name] = (ids, chosen, rows[:-1].argmax(-1).tolist())
    return out


async def score(engine: Engine, model: str, prompt: str | list[int], **kwargs: Any) -> list[GenerationEvent]:
    lease = await engine.acquire(model)
    try:
        request = engine.text_request(
            lease, prompt, sampling=SamplingParams(temperature=0), **{"max_tokens": 0, **kwargs}
        )
        return [event async for event in engine.generate(lease, request)]
    finally:
        lease.release()


@pytest.mark.parametrize("model", ["tiny", "tiny+lora"])
def test_prompt_logprobs_match_a_full_transformers_forward(
    engine: Engine, reference: dict[str, tuple[list[int], list[float], list[int]]], model: str
) -> None:
    ids, expected, greedy = reference[model]
    for _ in range(2):  # the second time, a cached prefix exists and must not be used
        events = asyncio.run(score(engine, model, PROMPT, prompt_logprobs=1))
        scores = events[0].prompt_logprobs
        assert scores is not None
        got = [entry.logprob for entry in scores.scored]
        assert len(got) == len(ids) - 1
        assert got == pytest.approx(expected, abs=1e-4)
        tokenizer = engine.pool.entries()[0].loaded.tokenizer
        assert [entry.top[0][0] for entry in scores.scored] == [token_bytes(tokenizer, t)[0] for t in greedy]


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(engine: Engine) -> None:
    events = asyncio.run(score(engine, "tiny", [72, 105, 33], prompt_logprobs=2))
    assert [event.prompt_logprobs is not None for event in events] == [True, False]
    scores = events[0].prompt_logprobs
    tokenizer = engine.pool.entries()[0].loaded.tokenizer
    assert scores is not None and scores.first_token == token_bytes(tokenizer, 72)[0]
    assert [entry.token for entry in scores.scored] == [token_bytes(tokenizer, t)[0] for t in (105, 33)]
    assert all(len(entry.top) == 2 for entry in scores.scored)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 0
    assert events[-1].text == ""


def test_generation_after_scoring_equals_generation_without(engine: Engine) -> None:
    scored = asyncio.run(score(engine, "tiny+lora", PROMPT, prompt_logprobs=0, max_tokens=6))
    plain = asyncio.run(score(engine, "tiny+lora", PROMPT, max_tokens=6))
    assert "".join(e.text for e in scored) == "".join(e.text for e in plain)
    assert all(e.prompt_logprobs is None for e in plain)


def test_greedy_token_logprob_equals_its_top_entry_exactly() -> None:
    import torch

    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    rows = score_rows(logits, [1, 2], 1)
    assert rows[0][0] == rows[0][1][0][1] and rows[0][1][0][0] == 1
    assert rows[1][1][0][0] == 0 and rows[1][0] < rows[1][1][0][1]


def test_scored_chunks_bound_the_logits_held_at_once() -> None:
    assert scored_chunk_tokens(150_000, 512) * 150_000 * 4 <= 64 * 2**20
    assert scored_chunk_tokens(300, 512) == 512
    assert scored_chunk_tokens(10**9, 512) == 1


def test_a_prompt_filling_the_context_can_be_scored_but_not_continued(engine: Engine) -> None:
    from engines.errors import ContextLengthExceeded

    full = [65 + i % 26 for i in range(256)]
    events = asyncio.run(score(engine, "tiny", full, prompt_logprobs=0))
    assert events[0].prompt_logprobs is not None and len(events[0].prompt_logprobs.scored) == 255
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(score(engine, "tiny", full, max_tokens=1))
