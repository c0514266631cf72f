"""Settings that are refused when the configuration is read, before anything loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import ModelSettings


def test_int8_is_accepted_on_cpu() -> None:
    assert ModelSettings(source="org/model", quantization="int8").quantization == "int8"


def test_int8_on_cuda_is_refused_with_the_cuda_alternatives() -> None:
    with pytest.raises(ValidationError, match='"8bit"'):
        ModelSettings(source="org/model", quantization="int8", device="cuda:0")


@pytest.mark.parametrize("value", [False, True])
def test_engine_deterministic_reaches_the_scheduler(value: bool) -> None:
    from engines.engine import Engine
    from gateway.app import engine_limits
    from gateway.settings import Settings

    settings = Settings.model_validate(
        {"models": {"tiny": {"source": "org/tiny"}}, "engine": {"deterministic": value}}
    )
    engine = Engine(settings.catalog(), engine_limits(settings))
    try:
        assert engine.scheduler.deterministic is value
    finally:
        engine.close()
