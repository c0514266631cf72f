"""``EngineApi``, the seam the routes use: the in-process engine and the Ray ingress's engine both have it.

mypy checks the signatures (the app's engine factory is typed with it); this checks, on real objects,
that no member the routes call is missing from either, so a route never probes with ``getattr``.
"""

from __future__ import annotations

import inspect

import pytest

from engines.engine import Engine, EngineApi
from gateway.cluster.engine import ClusterEngine
from gateway.settings import ModelSettings, Settings

SETTINGS = Settings(models={"tiny": ModelSettings(source="org/tiny")})


def protocol_members() -> set[str]:
    members = set(getattr(EngineApi, "__annotations__", {}))
    members |= {name for name in vars(EngineApi) if not name.startswith("_")}
    return members


def missing_members(engine: object) -> list[str]:
    missing = []
    for name in sorted(protocol_members()):
        try:
            inspect.getattr_static(engine, name)
        except AttributeError:
            missing.append(name)
    return missing


def test_the_protocol_names_what_the_routes_use() -> None:
    assert {
        "acquire",
        "admit",
        "chat_request",
        "text_request",
        "compile_grammar",
        "models",
    } <= protocol_members()
    assert {"catalog", "pool", "scheduler", "reporters", "cancel_fetches", "close"} <= protocol_members()


def test_the_in_process_engine_has_every_member_of_the_engine_api() -> None:
    engine = Engine(SETTINGS.catalog())
    try:
        assert missing_members(engine) == []
    finally:
        engine.close()


def test_the_cluster_engine_has_every_member_of_the_engine_api() -> None:
    engine = ClusterEngine(settings=SETTINGS, handle=None, directory=None)
    assert missing_members(engine) == []


@pytest.mark.parametrize("name", ["cancel_fetches", "close"])
def test_the_cluster_engine_answers_the_shutdown_calls_without_ray(name: str) -> None:
    engine = ClusterEngine(settings=SETTINGS, handle=None, directory=None)
    getattr(engine, name)()
