"""Where the configuration comes from: a TOML file (``--config`` or ``$PEFT_GATEWAY_CONFIG``) and
``PEFT_GATEWAY_*`` environment variables (``__`` between levels, lists as JSON), the environment winning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.settings import CONFIG_ENV, Settings, SettingsError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PEFT_GATEWAY_*`` variable of the machine running the tests leaks into these."""
    for name in list(os.environ):
        if name.startswith("PEFT_GATEWAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, body: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text('[models.tiny]\nsource = "org/tiny"\n' + body)
    return path


def test_a_nested_key_comes_from_the_environment_with_double_underscores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__PORT", "9000")
    monkeypatch.setenv("PEFT_GATEWAY_ENGINE__LEAN_DECODE", "false")
    monkeypatch.setenv("PEFT_GATEWAY_MAX_RANK", "32")
    settings = load_settings()
    assert settings.server.port == 9000
    assert settings.engine.lean_decode is False
    assert settings.max_rank == 32


def test_lists_come_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__API_KEYS", '["sk-one", "sk-two"]')
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__CORS_ORIGINS", '["http://app.test"]')
    monkeypatch.setenv("PEFT_GATEWAY_ADAPTER_DIRS", f'["{tmp_path}"]')
    settings = load_settings()
    assert settings.server.api_keys == ["sk-one", "sk-two"]
    assert settings.server.cors_origins == ["http://app.test"]
    assert settings.adapter_dirs == [tmp_path]


def test_the_environment_wins_over_the_file_and_the_rest_of_the_file_stays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, '[server]\nport = 8001\nhost = "0.0.0.0"\napi_keys = ["sk-file"]\n')
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__PORT", "9000")
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__API_KEYS", '["sk-env"]')
    settings = load_settings(path)
    assert settings.server.port == 9000 and settings.server.api_keys == ["sk-env"]
    assert settings.server.host == "0.0.0.0"
    assert settings.models["tiny"].source == "org/tiny"


def test_the_environment_sets_one_key_of_a_model_the_file_configures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, 'dtype = "float32"\n')
    monkeypatch.setenv("PEFT_GATEWAY_MODELS__TINY__DTYPE", "bfloat16")
    model = load_settings(path).models["tiny"]
    assert (model.source, model.dtype) == ("org/tiny", "bfloat16")


def test_the_config_file_is_found_through_peft_gateway_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write(tmp_path, "[server]\nport = 8123\n")))
    settings = load_settings()
    assert settings.server.port == 8123 and list(settings.models) == ["tiny"]


def test_an_explicit_config_path_wins_over_peft_gateway_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write(tmp_path, "[server]\nport = 8123\n", "env.toml")))
    explicit = write(tmp_path, "[server]\nport = 8456\n", "flag.toml")
    assert load_settings(explicit).server.port == 8456


def test_a_missing_peft_gateway_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(SettingsError, match=r"nowhere\.toml: config file not found"):
        load_settings()


def test_a_wrong_type_in_the_environment_names_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PEFT_GATEWAY_SERVER__PORT", "not-a-port")
    with pytest.raises(SettingsError, match=r"server\.port"):
        load_settings(write(tmp_path, ""))


def test_config_example_toml_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.models["llama-2-chat-7b"].source == "meta-llama/Llama-2-7b-chat-hf"
    assert settings.adapters["chinese"].base == "llama-2-chat-7b"
    assert settings.models["llama-2-chat-7b"].trust_remote_code is False


def test_config_example_toml_states_the_defaults() -> None:
    """The annotated reference sets each key it shows to the value the gateway uses without it."""
    example = load_settings(EXAMPLE)
    defaults = Settings()
    for section in ("server", "cache", "engine", "hub", "cluster"):
        assert getattr(example, section) == getattr(defaults, section), section
    top = ("adapter_dirs", "allow_pickle", "max_rank", "base_match")
    assert {key: getattr(example, key) for key in top} == {key: getattr(defaults, key) for key in top}
    model = example.models["llama-2-chat-7b"]
    for key in (
        "revision",
        "dtype",
        "device",
        "quantization",
        "context_length",
        "adapter_mode",
        "tool_parser",
    ):
        assert getattr(model, key) == type(model).model_fields[key].default, key
