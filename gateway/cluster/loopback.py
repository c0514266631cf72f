"""Keep Ray Serve's per-replica gRPC listener on loopback for single-machine (``local``) clusters.

Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on ``[::]:0``, all interfaces,
hard-coded; it carries no traffic unless ``RAY_SERVE_USE_GRPC_BY_DEFAULT=1``. On one machine nothing
outside it needs that port, so this hook (Ray's ``worker_process_setup_hook``, run in each worker
process before any replica starts) binds it to 127.0.0.1 instead. Multi-host clusters do not use it.
This module imports nothing heavy: the hook runs in every Ray worker of the job.
"""

from __future__ import annotations

from typing import Any

HOOK = "gateway.cluster.loopback.keep_serve_grpc_on_loopback"


def keep_serve_grpc_on_loopback() -> None:
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server  # type: ignore[attr-defined]
    if getattr(original, "_peft_gateway_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        return int(original(server, address.replace("[::]", "127.0.0.1", 1)))

    on_loopback._peft_gateway_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback  # type: ignore[attr-defined]
