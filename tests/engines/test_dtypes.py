"""bf16 serving gives the same greedy answers as fp32 on a model trained to a clear margin (the demo)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.demo.content import DEMO_QUESTIONS
from engines.demo.models import ensure_demo_models
from engines.engine import Engine, EngineLimits
from engines.generation import ChatMessage
from engines.sampling import SamplingParams

pytestmark = pytest.mark.slow


async def answer(engine: Engine, model: str, question: str) -> str:
    lease = await engine.acquire(model)
    try:
        request = engine.chat_request(
            lease,
            [ChatMessage(role="user", content=question)],
            max_tokens=64,
            sampling=SamplingParams(temperature=0),
        )
        return "".join([event.text async for event in engine.generate(lease, request)])
    finally:
        lease.release()


@pytest.mark.parametrize("mode", ["merge", "multi"])
def test_bf16_demo_answers_equal_fp32_answers(demo_dir: Path, mode: str) -> None:
    demo = ensure_demo_models(demo_dir)
    catalog = Catalog(
        bases=(
            BaseSpec(
                name="demo",
                source=str(demo.base_dir),
                dtype="bfloat16",
                adapter_mode=mode,
                aliases=("peft-gateway/demo-base",),
            ),
        ),
        adapters=(AdapterSpec(alias="zh", source=str(demo.adapter_dir), base="demo"),),
        policy=AdapterPolicy(),
    )
    engine = Engine(catalog, EngineLimits())
    try:

        async def scenario() -> None:
            lease = await engine.acquire("demo")
            assert lease.loaded.dtype == "bfloat16"
            lease.release()
            for question, (english, chinese) in DEMO_QUESTIONS.items():
                assert await answer(engine, "demo", question) == english
                assert await answer(engine, "demo+zh", question) == chinese

        asyncio.run(scenario())
    finally:
        engine.close()
