"""Deploying the gateway on Ray Serve: the ingress and engine deployments, a private local Ray instance,
and ``peft-gateway serve --ray``.

Ray is imported inside the functions, so that importing this module (the CLI does, to say what to
install) costs nothing without Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from engines.ray_replica import DIRECTORY_NAME, ReplicaDirectory, replica_class
from gateway.cluster.engine import ClusterEngine
from gateway.cluster.header import ReplicaHeader
from gateway.cluster.loopback import HOOK as LOOPBACK_HOOK
from gateway.cluster.metrics import ReplicaCollector
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings

APP_NAME = "peft-gateway"


#: Environment for a private local Ray instance: every listener on 127.0.0.1, no token file written
#: into ~/.ray (it would change later runs), no usage reporting.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


#: How long Serve's router waits to learn which replica took a new model name before it falls back to
#: "the replica with the fewest models" (Serve's default, 1 s, is shorter than its own update latency
#: on a busy host, and a miss there loads the adapter on a second replica). Set in the ingress.
ROUTER_ENV = {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "3"}


def cluster_engine_factory(
    engine_handle: Any, directory_namespace: str
) -> Callable[[Settings, GatewayMetrics], ClusterEngine]:
    """``create_app``'s engine factory for the ingress replica."""

    def factory(settings: Settings, metrics: GatewayMetrics) -> ClusterEngine:
        import ray

        directory = ray.get_actor(DIRECTORY_NAME, namespace=directory_namespace)
        engine = ClusterEngine(settings=settings, handle=engine_handle, directory=directory)
        engine.reporters.append(metrics.record_generation)
        metrics.label_models_from(engine)
        metrics.registry.register(ReplicaCollector(engine))
        engine.start()
        return engine

    return factory


class GatewayIngress:
    """Serve's HTTP ingress: builds the ordinary gateway app with a ``ClusterEngine`` inside."""

    def __init__(self, settings: dict[str, Any], engine_handle: Any, directory_namespace: str) -> None:
        self._settings = Settings.model_validate(settings)
        self._factory = cluster_engine_factory(engine_handle, directory_namespace)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from gateway.app import create_app
        from gateway.logs import configure_logging

        configure_logging(self._settings.server.log_format, self._settings.server.log_level)
        app = create_app(self._settings, engine_factory=self._factory)
        app.add_middleware(ReplicaHeader)
        return app


def build_application(settings: Settings, directory_namespace: str) -> Any:
    """The Serve application: ingress -> engine deployment, shaped by ``[cluster]``."""
    from ray import serve

    from gateway.app import engine_limits

    cluster = settings.cluster
    limits = engine_limits(settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cluster.cpus_per_replica, "num_gpus": cluster.gpus_per_replica},
        "health_check_period_s": cluster.health_check_period_s,
        "graceful_shutdown_timeout_s": 5.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        # Beyond a full batch and queue the engine answers 503 itself; Serve must not queue in front.
        "max_ongoing_requests": limits.max_batch + limits.max_waiting,
    }
    if cluster.min_replicas is not None and cluster.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas,
            "max_replicas": cluster.max_replicas,
            "target_ongoing_requests": limits.max_batch,
        }
    else:
        options["num_replicas"] = cluster.num_replicas
    engines = serve.deployment(name="EngineReplica", **options)(replica_class(cluster.max_models_per_replica))
    ingress = serve.deployment(
        name="Gateway",
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": ROUTER_ENV}},
        max_ongoing_requests=1000,
        health_check_period_s=cluster.health_check_period_s,
        graceful_shutdown_timeout_s=5.0,
        graceful_shutdown_wait_loop_s=0.5,
    )(serve.ingress()(GatewayIngress))
    return ingress.bind(
        settings.model_dump(mode="json"),
        engines.bind(settings.catalog(), limits, directory_namespace),
        directory_namespace,
    )


def start_directory(namespace: str, health_check_period_s: float) -> Any:
    """The snapshot directory actor; detached, so it outlives the deploying process's handle to it
    (``undeploy`` removes it with the application)."""
    import ray

    return (
        ray.remote(ReplicaDirectory)
        .options(
            name=DIRECTORY_NAME, namespace=namespace, get_if_exists=True, num_cpus=0, lifetime="detached"
        )
        .remote(stale_seconds=3 * health_check_period_s + 2)
    )


def undeploy(namespace: str = APP_NAME) -> None:
    """Remove the application and its directory actor (Serve itself and Ray are left running)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=namespace))


def deploy(settings: Settings, *, host: str, port: int, namespace: str = APP_NAME) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and deploy the app."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    directory = start_directory(namespace, settings.cluster.health_check_period_s)
    handle = serve.run(build_application(settings, namespace), name=APP_NAME, route_prefix="/")
    return handle, directory


def init_local_ray(
    temp_dir: str, *, num_cpus: float | None = None, object_store_bytes: int = 200 * 2**20
) -> None:
    """A private Ray instance on this machine, every listener on 127.0.0.1 (see ``LOOPBACK_ENV``)."""
    for key, value in {**LOOPBACK_ENV, **ROUTER_ENV}.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(
        address="local",
        num_cpus=int(num_cpus) if num_cpus is not None else None,
        include_dashboard=False,
        object_store_memory=object_store_bytes,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        namespace=APP_NAME,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK, "env_vars": local_import_path()},
    )


def local_import_path() -> dict[str, str]:
    """``PYTHONPATH`` for a private instance's workers: where this process imports the gateway from.

    Workers import ``gateway`` and ``engines`` by name (the setup hook, the deployments). Run from a
    source checkout (``python -m gateway.cli``) or through a stale editable install, the driver finds
    them on its own ``sys.path`` but the workers would not, and every worker would fail to start.
    """
    source = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(part for part in (source, existing) if part)}


def serve_on_ray(settings: Settings, address: str) -> int:
    """``peft-gateway serve --ray ADDRESS``: deploy, then wait for Ctrl-C or SIGTERM, then tear down.

    ``local`` starts a private Ray instance (torn down on exit); any other value joins that cluster
    (``auto``, ``ray://host:10001`` or ``host:6379``) and only removes this application on exit.
    """
    import ray
    from ray import serve

    local = address == "local"
    temp_dir = tempfile.mkdtemp(prefix="pgw-ray-", dir="/tmp") if local else None
    if temp_dir is not None:
        init_local_ray(temp_dir)
    else:
        ray.init(address=address, namespace=APP_NAME, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings, host=settings.server.host, port=settings.server.port)
        print(
            f"peft-gateway: serving {', '.join(settings.models)} through Ray Serve on "
            f"http://{settings.server.host}:{settings.server.port}",
            flush=True,
        )
        stop.wait()
    finally:
        undeploy()
        if local:
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0
