"""``ClusterEngine`` against a scripted stand-in for the Serve handle: caching, retries, error types."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engines.errors import ModelNotFound
from engines.generation import GenerationEvent, GenerationRequest
from engines.ray_replica import ModelFacts, ReplicaUnavailable
from gateway.cluster.engine import ClusterEngine
from gateway.settings import ModelSettings, Settings

ray_exceptions = pytest.importorskip("ray.exceptions", reason="ray is not installed")

DONE = GenerationEvent(text="!", prompt_tokens=3, completion_tokens=2, finish_reason="stop")
PARTIAL = GenerationEvent(text="hi", prompt_tokens=3, completion_tokens=1)


class Stream:
    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._run()

    async def _run(self) -> AsyncIterator[Any]:
        for item in self.items:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    def __init__(self, run: Any) -> None:
        self.remote = run


class FakeHandle:
    """``handle.options(...).describe.remote(...)`` and ``.generate.remote(...)`` as Serve spells them."""

    def __init__(
        self, streams: list[list[Any]] | None = None, describe_error: Exception | None = None
    ) -> None:
        self.streams = streams or []
        self.describe_error = describe_error
        self.described: list[tuple[str, frozenset[str]]] = []
        self.streamed: list[str] = []
        self.options_seen: list[dict[str, Any]] = []
        self.describe = Method(self._describe)
        self.generate = Method(self._generate)

    def options(self, **options: Any) -> FakeHandle:
        self.options_seen.append(options)
        return self

    async def _describe(self, key: str, known: frozenset[str]) -> tuple[str, Any]:
        self.described.append((key, known))
        if self.describe_error is not None:
            return "error", self.describe_error
        base = key.split("+")[0]
        facts = ModelFacts(
            model_id=key,
            tokenizer_key=base,
            context_length=64,
            sampling_defaults={},
            dtype="float32",
            device="cpu",
            parent=base if "+" in key else None,
            root=None,
            load_seconds=0.0,
            replica="r1",
        )
        return "facts", (facts, None if base in known else f"tokenizer of {base}")

    def _generate(self, model_id: str, request: GenerationRequest) -> Stream:
        self.streamed.append(model_id)
        return Stream(self.streams.pop(0))


def engine(handle: FakeHandle) -> ClusterEngine:
    settings = Settings(models={"tiny": ModelSettings(source="org/tiny")})
    return ClusterEngine(settings=settings, handle=handle, directory=None)


async def collect(cluster: ClusterEngine, model: str) -> list[GenerationEvent]:
    lease = await cluster.acquire(model)
    return [
        event
        async for event in cluster.generate(lease, GenerationRequest(prompt_ids=(1, 2, 3), max_tokens=4))
    ]


def test_acquire_asks_a_replica_once_per_model_and_fetches_each_tokenizer_once() -> None:
    handle = FakeHandle()
    cluster = engine(handle)

    async def run() -> list[Any]:
        return [await cluster.acquire(name) for name in ("tiny+org/a", "tiny+org/a", "tiny+org/b")]

    leases = asyncio.run(run())
    assert [key for key, _ in handle.described] == ["tiny+org/a", "tiny+org/b"]
    assert handle.described[1][1] == frozenset({"tiny"})
    assert {lease.loaded.tokenizer for lease in leases} == {"tokenizer of tiny"}
    assert handle.options_seen[0] == {"multiplexed_model_id": "tiny+org/a"}


def test_a_replica_lost_before_its_first_event_is_replaced_by_a_resend() -> None:
    handle = FakeHandle(
        [[("replica", "r1"), ray_exceptions.ActorDiedError()], [("replica", "r2"), ("event", DONE)]]
    )
    events = asyncio.run(collect(engine(handle), "tiny+org/a"))
    assert events == [DONE]
    assert handle.streamed == ["tiny+org/a", "tiny+org/a"]


def test_the_replica_name_may_come_with_the_first_event_in_one_item() -> None:
    from gateway.cluster.header import CURRENT_REPLICA, ReplicaNote

    handle = FakeHandle([[("named", ("r1", PARTIAL)), ("event", DONE)]])
    note = ReplicaNote()

    async def run() -> list[GenerationEvent]:
        CURRENT_REPLICA.set(note)
        return await collect(engine(handle), "tiny+org/a")

    assert asyncio.run(run()) == [PARTIAL, DONE]
    assert note.name == "r1"


def test_a_replica_lost_mid_stream_ends_it_with_replica_unavailable() -> None:
    handle = FakeHandle([[("replica", "r1"), ("event", PARTIAL), ray_exceptions.ActorDiedError()]])
    cluster = engine(handle)
    seen: list[GenerationEvent] = []

    async def run() -> None:
        lease = await cluster.acquire("tiny+org/a")
        async for event in cluster.generate(lease, GenerationRequest(prompt_ids=(1,), max_tokens=4)):
            seen.append(event)

    with pytest.raises(ReplicaUnavailable):
        asyncio.run(run())
    assert seen == [PARTIAL] and len(handle.streamed) == 1


def test_engine_errors_from_a_replica_keep_their_type() -> None:
    handle = FakeHandle(describe_error=ModelNotFound("no such adapter", param="model"))
    with pytest.raises(ModelNotFound, match="no such adapter"):
        asyncio.run(engine(handle).acquire("tiny+org/missing"))
