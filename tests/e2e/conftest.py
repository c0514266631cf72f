from __future__ import annotations

from typing import Any

import pytest

from gateway.settings import AdapterSettings, ModelSettings, ServerSettings, Settings
from tests.conftest import RunningServer, TinyModels

#: The admin key every test server accepts for the admin routes (load/unload adapters and models).
ADMIN_KEY = "sk-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


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
        **{"server": ServerSettings(admin_keys=[ADMIN_KEY]), **overrides},
    )


@pytest.fixture(scope="session")
def tiny_server(start_server: Any, tiny_models: TinyModels) -> RunningServer:
    server: RunningServer = start_server(tiny_settings(tiny_models))
    return server
