"""A real two-node Ray cluster on 127.0.0.1 with the gateway deployed on it, shared by a module.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, so the loopback environment is
set here, before anything imports ray. The cluster is small (two 1-CPU nodes, 80 MiB object stores,
no dashboard) and always torn down, also when a test fails. Ray tests must not run in parallel (the
dashboard agent always takes port 52365).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cluster.deploy import LOOPBACK_ENV, ROUTER_ENV, local_import_path
from gateway.cluster.loopback import HOOK as LOOPBACK_HOOK
from gateway.settings import (
    AdapterSettings,
    ClusterSettings,
    EngineSettings,
    ModelSettings,
    ServerSettings,
    Settings,
)
from tests.conftest import TinyModels, free_port
from tests.e2e.conftest import ADMIN_KEY

for _key, _value in {**LOOPBACK_ENV, **ROUTER_ENV}.items():
    os.environ.setdefault(_key, _value)

ADAPTERS = ("lora-a", "lora-b", "lora-c", "lora-d")


@dataclass
class RayGateway:
    url: str
    settings: Settings
    ray: Any

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="module")
def ray_settings(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tiny base and four adapters that change its output, two engine replicas."""
    from engines.testing.tiny import save_tiny_adapter

    folder = tmp_path_factory.mktemp("ray-adapters")
    adapters = {
        name: AdapterSettings(
            source=str(
                save_tiny_adapter(
                    tiny_models.base, folder / name, seed=10 + i, base_model_name_or_path="test-org/tiny-base"
                )
            ),
            base="tiny",
        )
        for i, name in enumerate(ADAPTERS)
    }
    return Settings(
        models={
            "tiny": ModelSettings(
                source=str(tiny_models.base),
                aliases=["test-org/tiny-base"],
                dtype="float32",
                context_length=256,
            )
        },
        adapters=adapters,
        engine=EngineSettings(threads=1),
        server=ServerSettings(admin_keys=[ADMIN_KEY]),
        cluster=ClusterSettings(num_replicas=2, cpus_per_replica=0.6, health_check_period_s=1.0),
    )


@pytest.fixture(scope="module")
def ray_gateway(ray_settings: Settings) -> Iterator[RayGateway]:
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'peft-gateway[ray]'")
    from ray import serve
    from ray.cluster_utils import Cluster

    from gateway.cluster.deploy import deploy, undeploy

    # A short private temp dir (Ray's socket paths must stay short), also for the address file Ray
    # writes under $RAY_TMPDIR/ray, so nothing lands in the shared /tmp/ray.
    temp = tempfile.mkdtemp(prefix="pgw-ray-", dir="/tmp")
    previous_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    (Path(temp) / "ray").mkdir()
    node = {
        "num_cpus": 1,
        "include_dashboard": False,
        "object_store_memory": 80 * 2**20,
        "node_ip_address": "127.0.0.1",
    }
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**node, "temp_dir": str(Path(temp) / "ray")})
        cluster.add_node(**node)
        ray.init(
            address=cluster.address,
            namespace="peft-gateway",
            configure_logging=False,
            log_to_driver=False,
            runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK, "env_vars": local_import_path()},
        )
        port = free_port()
        deploy(ray_settings, host="127.0.0.1", port=port)
        gateway = RayGateway(url=f"http://127.0.0.1:{port}", settings=ray_settings, ray=ray)
        wait_ready(gateway)
        yield gateway
    finally:
        undeploy()
        serve.shutdown()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if previous_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous_tmpdir
        shutil.rmtree(temp, ignore_errors=True)


def wait_ready(gateway: RayGateway, replicas: int = 2, timeout: float = 120.0) -> None:
    """Until ``/ready`` answers 200 and ``replicas`` engine replicas report in ``/metrics``."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200
            metrics = httpx.get(f"{gateway.url}/metrics", timeout=5).text
            if ready and f"peft_gateway_replicas {float(replicas)}" in metrics:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray gateway did not report {replicas} ready replicas in {timeout:.0f} s")
        time.sleep(0.5)
