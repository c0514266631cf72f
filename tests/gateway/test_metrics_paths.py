"""``/metrics`` labels every route by its own path; only unknown paths are lumped together as ``other``."""

from __future__ import annotations

import pytest

from gateway.metrics import GatewayMetrics


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
