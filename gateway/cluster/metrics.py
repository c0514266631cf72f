"""Per-replica Prometheus metrics in the ingress, from the snapshots the replicas publish."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.ray_replica import ReplicaSnapshot
from gateway.cluster.engine import ClusterEngine


class ReplicaCollector(Collector):
    """Per-replica gauges and counters from the replicas' snapshots, labelled ``replica``.

    ``vllm:lora_requests_info`` follows vLLM's metric (value: the time of the snapshot; labels: the
    adapters with running and waiting requests, comma-separated, and ``max_lora``), which adapter-aware
    routers such as the Kubernetes Gateway API Inference Extension read.
    """

    def __init__(self, engine: ClusterEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        snapshots = self._engine.snapshots
        yield GaugeMetricFamily("peft_gateway_replicas", "Engine replicas reporting.", value=len(snapshots))
        gauges: dict[str, tuple[str, Callable[[ReplicaSnapshot], float]]] = {
            "peft_gateway_replica_models_loaded": ("Loaded bases and variants.", lambda s: len(s.loaded)),
            "peft_gateway_replica_cache_bytes": ("Bytes of weights held.", lambda s: s.cache_bytes),
            "peft_gateway_replica_queue_depth": ("Requests waiting for a slot.", lambda s: s.queue_depth),
            "peft_gateway_replica_active_sequences": ("Sequences running.", lambda s: s.active_sequences),
        }
        for name, (help_text, read) in gauges.items():
            gauge = GaugeMetricFamily(name, help_text, labels=["replica"])
            for snapshot in snapshots:
                gauge.add_metric([snapshot.replica], float(read(snapshot)))
            yield gauge
        served = CounterMetricFamily("peft_gateway_replica_requests", "Streams started.", labels=["replica"])
        for snapshot in snapshots:
            served.add_metric([snapshot.replica], float(snapshot.requests))
        yield served
        for counter in ("loads", "hits", "misses", "evictions"):
            per_model = CounterMetricFamily(
                f"peft_gateway_replica_model_{counter}",
                f"Pool {counter} per model.",
                labels=["replica", "model"],
            )
            for snapshot in snapshots:
                for model, value in sorted(snapshot.counters.get(counter, {}).items()):
                    per_model.add_metric([snapshot.replica, model], float(value))
            yield per_model
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters per replica (vLLM-compatible).",
            labels=["replica", "running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        for snapshot in snapshots:
            info.add_metric(
                [
                    snapshot.replica,
                    ",".join(snapshot.running_adapters),
                    ",".join(snapshot.waiting_adapters),
                    str(snapshot.max_lora),
                ],
                snapshot.time,
            )
        yield info
