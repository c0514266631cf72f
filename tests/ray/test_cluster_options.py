"""``[cluster]`` turned into Ray Serve deployment options by ``build_application``, without starting Ray.

``ray.serve.deployment`` / ``ingress`` / ``multiplexed`` are replaced by recorders, so what the gateway
asks Serve for is checked as Serve would receive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings, load_settings

serve = pytest.importorskip("ray.serve", reason="ray is not installed: pip install 'peft-gateway[ray]'")


@dataclass
class Recorded:
    """What ``build_application`` asked Serve for, by deployment name."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    bound: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    multiplexed: list[int] = field(default_factory=list)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    record = Recorded()

    class Deployment:
        def __init__(self, name: str) -> None:
            self.name = name

        def bind(self, *args: Any) -> tuple[str, tuple[Any, ...]]:
            record.bound[self.name] = args
            return (self.name, args)

    def deployment(*, name: str, **options: Any) -> Any:
        record.options[name] = options
        return lambda target: Deployment(name)

    def multiplexed(*, max_num_models_per_replica: int) -> Any:
        record.multiplexed.append(max_num_models_per_replica)
        return lambda method: method

    monkeypatch.setattr(serve, "deployment", deployment)
    monkeypatch.setattr(serve, "ingress", lambda *args, **kwargs: lambda cls: cls)
    monkeypatch.setattr(serve, "multiplexed", multiplexed)
    return record


def settings_from(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "config.toml"
    path.write_text('[models.tiny]\nsource = "org/tiny"\n' + body)
    return load_settings(path)


def build(settings: Settings) -> Any:
    from gateway.cluster.deploy import build_application

    return build_application(settings, "test-namespace")


def test_fixed_replicas_and_their_resources_come_from_cluster(recorded: Recorded, tmp_path: Path) -> None:
    body = (
        "[engine]\nmax_batch = 8\nmax_waiting = 10\n"
        "[cluster]\nnum_replicas = 3\ncpus_per_replica = 0.5\ngpus_per_replica = 1.0\nhealth_check_period_s = 4.0\n"
    )
    build(settings_from(tmp_path, body))
    engine = recorded.options["EngineReplica"]
    assert engine["num_replicas"] == 3 and "autoscaling_config" not in engine
    assert engine["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    assert engine["health_check_period_s"] == 4.0
    # Beyond a full batch and queue the engine answers 503 itself: Serve must not queue in front of it.
    assert engine["max_ongoing_requests"] == 18


def test_min_and_max_replicas_switch_on_autoscaling(recorded: Recorded, tmp_path: Path) -> None:
    body = "[engine]\nmax_batch = 4\n[cluster]\nnum_replicas = 5\nmin_replicas = 1\nmax_replicas = 6\n"
    build(settings_from(tmp_path, body))
    engine = recorded.options["EngineReplica"]
    assert "num_replicas" not in engine
    assert engine["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": 4,
    }


def test_max_models_per_replica_sizes_serves_multiplexing(recorded: Recorded, tmp_path: Path) -> None:
    build(settings_from(tmp_path, "[cluster]\nmax_models_per_replica = 7\n"))
    assert recorded.multiplexed == [7]


def test_defaults_are_one_replica_one_cpu_no_gpu(recorded: Recorded, tmp_path: Path) -> None:
    build(settings_from(tmp_path, ""))
    engine = recorded.options["EngineReplica"]
    assert engine["num_replicas"] == 1 and engine["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert engine["health_check_period_s"] == 2.0 and recorded.multiplexed == [16]


def test_the_ingress_takes_no_cpu_and_checks_health_as_often(recorded: Recorded, tmp_path: Path) -> None:
    build(settings_from(tmp_path, "[cluster]\nhealth_check_period_s = 3.5\n"))
    ingress = recorded.options["Gateway"]
    assert ingress["ray_actor_options"]["num_cpus"] == 0
    assert ingress["health_check_period_s"] == 3.5


def test_the_engine_replicas_get_the_configured_catalog_and_limits(
    recorded: Recorded, tmp_path: Path
) -> None:
    from gateway.app import engine_limits

    settings = settings_from(tmp_path, "[engine]\nprefill_chunk = 64\n[cache]\nmax_models = 2\n")
    build(settings)
    catalog, limits, namespace = recorded.bound["EngineReplica"]
    assert catalog == settings.catalog() and limits == engine_limits(settings)
    assert limits.prefill_chunk == 64 and limits.max_models == 2 and namespace == "test-namespace"
    dumped, _engines, _namespace = recorded.bound["Gateway"]
    assert Settings.model_validate(dumped).model_dump() == settings.model_dump()  # what the ingress rebuilds
