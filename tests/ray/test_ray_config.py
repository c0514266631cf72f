"""``[cluster]`` settings and ``serve --ray`` dispatch, without starting Ray."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from engines.catalog import AdapterSpec, BaseSpec, Catalog
from engines.errors import ModelNotFound
from engines.ray_replica import ReplicaDirectory, ReplicaSnapshot, routing_key
from gateway import cli
from gateway.settings import SettingsError, load_settings


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[models.tiny]\nsource = "org/tiny"\n' + body)
    return path


def test_cluster_defaults_to_one_replica_and_no_address(tmp_path: Path) -> None:
    cluster = load_settings(write_config(tmp_path, "")).cluster
    assert (cluster.ray_address, cluster.num_replicas, cluster.min_replicas) == (None, 1, None)


def test_cluster_section_is_read_from_the_config(tmp_path: Path) -> None:
    body = '[cluster]\nray_address = "auto"\nmin_replicas = 1\nmax_replicas = 4\ngpus_per_replica = 0.5\n'
    cluster = load_settings(write_config(tmp_path, body)).cluster
    assert (cluster.ray_address, cluster.min_replicas, cluster.max_replicas) == ("auto", 1, 4)
    assert cluster.gpus_per_replica == 0.5


@pytest.mark.parametrize(
    "body",
    ["min_replicas = 2\n", "min_replicas = 3\nmax_replicas = 2\n", "num_replicas = 0\n", "replicas = 2\n"],
)
def test_bad_cluster_settings_fail_at_start(tmp_path: Path, body: str) -> None:
    with pytest.raises(SettingsError, match="cluster"):
        load_settings(write_config(tmp_path, "[cluster]\n" + body))


def test_routing_key_folds_aliases_so_one_replica_serves_one_adapter() -> None:
    catalog = Catalog(
        bases=(BaseSpec(name="tiny", source="org/tiny", aliases=("org/tiny-base",)),),
        adapters=(AdapterSpec(alias="zh", source="org/zh-lora", base="tiny"),),
    )
    assert routing_key(catalog, "zh") == "tiny+zh"
    assert routing_key(catalog, "org/tiny-base+zh") == "tiny+zh"
    assert routing_key(catalog, "tiny+org/other@v2") == "tiny+org/other@v2"
    assert routing_key(catalog, "org/tiny-base") == "tiny"
    with pytest.raises(ModelNotFound):
        routing_key(catalog, "missing+org/x")


def test_directory_forgets_replicas_that_stopped_reporting() -> None:
    directory = ReplicaDirectory(stale_seconds=5)

    def snapshot(name: str, age: float) -> ReplicaSnapshot:
        import time

        return ReplicaSnapshot(
            replica=name,
            node="n",
            time=time.time() - age,
            models=(),
            loaded=(),
            cache_bytes=0,
            queue_depth=0,
            active_sequences=0,
            requests=0,
            running_adapters=(),
            waiting_adapters=(),
            max_lora=1,
        )

    directory.publish(snapshot("alive", 1))
    directory.publish(snapshot("dead", 10))
    assert [s.replica for s in directory.snapshots()] == ["alive"]


def test_serve_with_ray_address_deploys_on_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="ray is not installed: pip install 'peft-gateway[ray]'")
    import gateway.cluster.deploy

    calls: list[Any] = []
    monkeypatch.setattr(
        gateway.cluster.deploy, "serve_on_ray", lambda settings, address: calls.append(address) or 0
    )
    assert cli.main(["serve", "--config", str(write_config(tmp_path, "")), "--ray", "local"]) == 0
    config = write_config(tmp_path, '[cluster]\nray_address = "ray://head:10001"\n')
    assert cli.main(["serve", "--config", str(config)]) == 0
    assert calls == ["local", "ray://head:10001"]


def test_serve_with_ray_but_without_ray_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    monkeypatch.setitem(sys.modules, "gateway.cluster.deploy", None)
    code = cli.main(["serve", "--config", str(write_config(tmp_path, "")), "--ray", "local"])
    assert code == cli.EXIT_USAGE
    assert "peft-gateway[ray]" in capsys.readouterr().err
