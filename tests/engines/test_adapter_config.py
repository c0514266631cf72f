"""``engines.adapters.config``: every hostile ``adapter_config.json`` is a 400 naming adapter and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engines.adapters.config import MAX_CONFIG_BYTES, load_adapter_config, validate_adapter_config
from engines.errors import AdapterRejected

#: What ``LoraConfig(...).save_pretrained`` writes with peft 0.21 (the fields that carry values).
GOOD: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "test-org/tiny-base",
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
    "exclude_modules": None,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "runtime_config": {"ephemeral_gpu_offload": False},
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "inference_mode": True,
    "revision": None,
    "peft_version": "0.21.2",
}


def test_a_config_as_peft_saves_it_passes() -> None:
    assert validate_adapter_config(dict(GOOD), "org/good", max_rank=8) == GOOD


def test_rank_and_alpha_patterns_and_a_regex_target_pass() -> None:
    config = {
        **GOOD,
        "target_modules": r".*\.(?:q_proj|v_proj)",
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {r"layers\.0\..*": 16.5},
        "layers_to_transform": [0, 1],
        "init_lora_weights": "gaussian",
    }
    validate_adapter_config(config, "org/good")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", 5),
        ("target_modules", "(unclosed"),
        ("target_modules", [1, 2]),
        ("target_modules", "(a+)+$"),
        ("target_modules", r".*(\w|\w)*x"),
        ("target_modules", "(?:.*a)+"),
        ("rank_pattern", {"(q|v)+": 4}),
        ("rank_pattern", ["q_proj", 8]),
        ("rank_pattern", {"q_proj": "8"}),
        ("rank_pattern", {"[": 8}),
        ("rank_pattern", {"q_proj": 100000}),
        ("alpha_pattern", {"q_proj": "sixteen"}),
        ("alpha_pattern", [16]),
        ("lora_alpha", "16"),
        ("lora_alpha", True),
        ("lora_dropout", 2),
        ("r", "4"),
        ("r", 0),
        ("r", 4.5),
        ("layers_to_transform", "0"),
        ("layers_to_transform", [-1]),
        ("layers_pattern", 7),
        ("use_rslora", "yes"),
        ("fan_in_fan_out", 1),
        ("bias", "some"),
        ("modules_to_save", "lm_head"),
        ("modules_to_save", [None]),
        ("task_type", 7),
        ("task_type", "NOT_A_TASK"),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", 3),
        ("megatron_config", {"tensor_model_parallel_size": 1}),
        ("layer_replication", [[0, 2]]),
        ("loftq_config", "bits=4"),
        ("trainable_token_indices", "0,1"),
        ("base_model_name_or_path", ["a"]),
        ("qalora_group_size", "16"),
    ],
)
def test_a_bad_field_is_refused_naming_adapter_and_field(field: str, value: Any) -> None:
    with pytest.raises(AdapterRejected) as refused:
        validate_adapter_config({**GOOD, field: value}, "org/hostile", max_rank=64)
    assert "org/hostile" in refused.value.message
    assert field in refused.value.message


@pytest.mark.parametrize(
    "config",
    [
        [GOOD],
        {**GOOD, "peft_type": "PREFIX_TUNING"},
        {**GOOD, "peft_type": 3},
        {**GOOD, "use_dora": True},
        {key: value for key, value in GOOD.items() if key != "r"},
        {**GOOD, "target_modules": None, "target_parameters": None},
    ],
)
def test_unusable_configs_are_refused(config: Any) -> None:
    with pytest.raises(AdapterRejected, match="org/x"):
        validate_adapter_config(config, "org/x")


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "adapter_config.json"
    text = json.dumps({**GOOD, "loftq_config": {"x": "PLACEHOLDER"}}).replace('"PLACEHOLDER"', _nested(depth))
    path.write_text(text)
    with pytest.raises(AdapterRejected, match="nested"):
        load_adapter_config(path, "org/deep")


def test_an_oversized_config_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**GOOD, "padding": "x" * MAX_CONFIG_BYTES}))
    with pytest.raises(AdapterRejected, match="larger than"):
        load_adapter_config(path, "org/big")


@pytest.mark.parametrize("text", ["{not json", '{"r": NaN}', "\udcff"])
def test_unparsable_configs_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AdapterRejected, match="org/broken"):
        load_adapter_config(path, "org/broken")
