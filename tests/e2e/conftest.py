from __future__ import annotations

from typing import Any

import pytest

from gateway.settings import AdapterSettings, ModelSettings, Settings
from tests.conftest import RunningServer, TinyModels


def tiny_settings(models: TinyModels, **overrides: Any) -> Settings:
    return Settings(
        models={
            "tiny": ModelSettings(
                source=str(models.base), aliases=["test-org/tiny-base"], dtype="float32", context_length=256
            ),
            "tiny-8bit": ModelSettings(source=str(models.base), quantization="8bit"),
        },
        adapters={"tiny-lora": AdapterSettings(source=str(models.adapter), base="tiny")},
        adapter_dirs=[models.adapter_dirs],
        **overrides,
    )


@pytest.fixture(scope="session")
def tiny_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    server: RunningServer = start_server(tiny_settings(tiny_models))
    return server
