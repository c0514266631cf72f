"""``/metrics`` labels every route by its own path and every generation by its model; unknowns are ``other``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engines.catalog import Catalog
from engines.engine import GenerationReport
from gateway.metrics import GatewayMetrics
from gateway.settings import ModelSettings, Settings


@pytest.mark.parametrize(
    "path", ["/v1/load_model", "/v1/unload_model", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
)
def test_admin_routes_are_counted_under_their_own_path(path: str) -> None:
    metrics = GatewayMetrics()
    metrics.record_request(path, 200, 0.01)
    text = metrics.render().decode()
    assert f'peft_gateway_requests_total{{path="{path}",status="200"}} 1.0' in text
    assert 'path="other"' not in text


def test_unknown_paths_are_counted_as_other() -> None:
    metrics = GatewayMetrics()
    metrics.record_request("/no/such/route", 404, 0.01)
    assert 'path="other"' in metrics.render().decode()


@dataclass
class ReplicaModels:
    """What the Ray ingress's engine offers the metrics: its configuration and the models replicas described."""

    catalog: Catalog
    described: list[tuple[str, str]]

    def loaded_model_names(self) -> list[tuple[str, str]]:
        return self.described


def report(model: str) -> GenerationReport:
    return GenerationReport(model, "req", 3, 2, 0.05, 0.1, "length")


def test_generations_are_labelled_by_model_without_a_local_engine() -> None:
    settings = Settings(models={"tiny": ModelSettings(source="/models/tiny")})
    metrics = GatewayMetrics()
    metrics.label_models_from(ReplicaModels(settings.catalog(), [("tiny+org/lora", "tiny+org/lora")]))
    for model in ("tiny", "tiny+org/lora", "tiny+org/never-loaded"):
        metrics.record_generation(report(model))
    text = metrics.render().decode()
    assert 'peft_gateway_time_to_first_token_seconds_count{model="tiny"} 1.0' in text
    assert 'peft_gateway_time_to_first_token_seconds_count{model="tiny+org/lora"} 1.0' in text
    assert 'peft_gateway_time_to_first_token_seconds_count{model="other"} 1.0' in text


def test_generations_count_as_other_when_nothing_names_the_models() -> None:
    metrics = GatewayMetrics()
    metrics.record_generation(report("tiny"))
    assert 'peft_gateway_time_to_first_token_seconds_count{model="other"} 1.0' in metrics.render().decode()
