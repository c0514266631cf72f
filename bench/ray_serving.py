"""The cost of the Ray hop: the same model served directly and through Ray Serve, on this machine.

Run:  python -m bench.ray_serving            (a few minutes on 2 cores; needs peft-gateway[ray])
      python -m bench.ray_serving --engine-threads 1   (both engines on one thread: a core to spare)

Both gateways are real subprocesses (``peft-gateway serve`` and ``peft-gateway serve --ray local``
with one engine replica) driven by the openai SDK streaming, each alone on the machine, with 1 and 8
clients. Reported: aggregate tokens/s through Ray as a ratio to direct serving (target >= 0.85x), the
time to first token under that load, and the hop alone (target <= 20 ms): one-token requests sent
alternately to both gateways while both are up and idle, as the median of the paired differences.
Results also go to bench/results/ray_serving.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped
from bench.serving import Gateway, Row, load_test, wait_until_up

LEVELS = ((1, 3), (8, 16))  # (clients, requests)
QUICK_LEVELS = ((1, 2), (8, 8))


class RayGateway(Gateway):
    """``peft-gateway serve --ray local``: a private Ray instance, Serve's proxy on the same port."""

    #: torch threads of the engine replica (its CPU reservation); 0: every core.
    engine_threads = 0

    def __enter__(self) -> RayGateway:

        with self.config.open("a") as config:
            # The replica reserves every core, as the direct server uses them: Ray sets a task's
            # OMP_NUM_THREADS (so torch's threads) to its CPU reservation, and with 1.0 the engine
            # would run single-threaded and measure that rather than the Ray hop.
            cpus = self.engine_threads or os.cpu_count() or 1
            config.write(
                f"[cluster]\nnum_replicas = 1\ncpus_per_replica = {cpus}.0\nhealth_check_period_s = 1.0\n"
            )
        self.process = self.serve("--ray", "local", env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        wait_until_up(self.process, f"{self.url}/ready", "peft-gateway serve --ray local", 600, 0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.send_signal(2)  # SIGINT: the CLI removes the app and stops its Ray instance
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()


@functools.cache
def _http(url: str) -> Any:
    """One keep-alive HTTP client per gateway, as a long-lived client keeps its connection."""
    import httpx

    return httpx.Client(base_url=url, timeout=120)


@functools.cache
def _openai(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)


def _timed(probe: Callable[[str], object], url: str) -> float:
    started = time.perf_counter()
    probe(url)
    return (time.perf_counter() - started) * 1000


def _first_token(url: str) -> float:
    """Time to the first streamed token of a one-token chat answer to a two-token prompt (openai SDK)."""
    started = time.perf_counter()
    stream = _openai(url).chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = float("nan")
    for chunk in stream:
        if math.isnan(first) and chunk.choices and chunk.choices[0].delta.content:
            first = (time.perf_counter() - started) * 1000
    return first


def _whole_completion(url: str) -> object:
    body = {"model": "smol", "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    return _http(url).post("/v1/completions", json=body).raise_for_status()


def _models(url: str) -> object:
    return _http(url).get("/v1/models").raise_for_status()


HOP_PROBES: dict[str, Callable[[str], float]] = {
    "streamed, time to the first token": _first_token,
    "not streamed, whole one-token completion": lambda url: _timed(_whole_completion, url),
    "GET /v1/models (no engine work)": lambda url: _timed(_models, url),
}


def paired_hop_ms(direct_url: str, ray_url: str, pairs: int = 25) -> list[dict[str, float | str]]:
    """The Ray hop alone: the same probe alternately against both gateways, both up and idle.

    Prefill and decode of a one-token answer are small, and alternating the two servers request by
    request means both see the same machine state, so the median of the paired differences is the hop
    rather than this shared machine's drift between two phases. Each gateway gets one long-lived
    client (keep-alive), as an application's openai client is.
    """
    results: list[dict[str, float | str]] = []
    for name, probe in HOP_PROBES.items():
        probe(direct_url), probe(ray_url)  # warm both paths
        direct, through_ray = [], []
        for _ in range(pairs):
            direct.append(probe(direct_url))
            through_ray.append(probe(ray_url))
        added = [r - d for d, r in zip(direct, through_ray, strict=True)]
        results.append(
            {
                "probe": name,
                "direct_ms": statistics.median(direct),
                "ray_ms": statistics.median(through_ray),
                "added_ms": statistics.median(added),
            }
        )
        print(
            f"{name}: direct {results[-1]['direct_ms']:.1f} ms, Ray {results[-1]['ray_ms']:.1f} ms, "
            f"added (median of {pairs} pairs) {results[-1]['added_ms']:+.1f} ms",
            flush=True,
        )
    return results


def measure(gateway: Gateway, label: str, new_tokens: int, levels: tuple[tuple[int, int], ...]) -> list[Row]:
    load_test(gateway.url, ["smol"], 1, 1, 4, f"{label} warm-up")
    rows = []
    for clients, requests in levels:
        row = load_test(gateway.url, ["smol"], clients, requests, new_tokens, f"{label}, {clients} clients")
        print(f"{row.name}: {row.tokens_per_second:.2f} tok/s, TTFT {row.ttft_ms:.0f} ms", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="2 and 8 requests, for a busy machine")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=0,
        help="torch threads for both engines (default: every core); fewer leaves cores to Ray's processes",
    )
    args = parser.parse_args(argv)
    levels = QUICK_LEVELS if args.quick else LEVELS
    base, adapters = ensure_smollm2_shaped()
    # Throughput: each gateway alone on the machine. The hop: both up and idle, probed alternately.
    threads = f"threads = {args.engine_threads}" if args.engine_threads else ""
    with Gateway(base, adapters, dtype=args.dtype, extra_toml=threads) as direct:
        direct.preload("smol")
        direct_rows = measure(direct, "direct", args.new_tokens, levels)
        through_ray = RayGateway(base, adapters, dtype=args.dtype, extra_toml=threads)
        through_ray.engine_threads = args.engine_threads
        through_ray.__enter__()
        try:
            through_ray.preload("smol")
            hop = paired_hop_ms(direct.url, through_ray.url)
        except BaseException:
            through_ray.__exit__()
            raise
    try:
        ray_rows = measure(through_ray, "through Ray", args.new_tokens, levels)
    finally:
        through_ray.__exit__()
    print(
        "| probe (one request at a time, both gateways up) | direct ms | Ray ms | added ms (median of pairs) |"
    )
    print("| --- | ---: | ---: | ---: |")
    for probe in hop:
        print(
            f"| {probe['probe']} | {probe['direct_ms']:.0f} | {probe['ray_ms']:.0f} | {probe['added_ms']:+.0f} |"
        )
    print("| clients | direct tok/s | Ray tok/s | ratio | direct TTFT ms | Ray TTFT ms | added TTFT ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (clients, _), d, r in zip(levels, direct_rows, ray_rows, strict=True):
        assert d.ttft_ms is not None and r.ttft_ms is not None
        print(
            f"| {clients} | {d.tokens_per_second:.1f} | {r.tokens_per_second:.1f} | "
            f"{r.tokens_per_second / d.tokens_per_second:.2f}x | {d.ttft_ms:.0f} | {r.ttft_ms:.0f} | "
            f"{r.ttft_ms - d.ttft_ms:+.0f} |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ray_serving.json").write_text(
        json.dumps(
            {
                "hop": hop,
                "direct": [asdict(r) for r in direct_rows],
                "ray": [asdict(r) for r in ray_rows],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
