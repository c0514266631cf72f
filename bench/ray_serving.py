"""The cost of the Ray hop: the same model served directly and through Ray Serve, on this machine.

Run:  python -m bench.ray_serving            (a few minutes on 2 cores; needs peft-gateway[ray])

Both gateways are real subprocesses (``peft-gateway serve`` and ``peft-gateway serve --ray local``
with one engine replica) driven by the openai SDK streaming, one after the other, with 1 and 8
clients. Reported: aggregate tokens/s through Ray as a ratio to direct serving (target >= 0.85x), and
the time to first token that Ray adds (median, target <= 20 ms). Results also go to
bench/results/ray_serving.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from bench.models import ensure_smollm2_shaped
from bench.serving import Gateway, Row, load_test, stream_one

LEVELS = ((1, 3), (8, 16))  # (clients, requests)
QUICK_LEVELS = ((1, 2), (8, 8))


class RayGateway(Gateway):
    """``peft-gateway serve --ray local``: a private Ray instance, Serve's proxy on the same port."""

    def __enter__(self) -> RayGateway:
        import httpx

        with self.config.open("a") as config:
            # The replica reserves every core, as the direct server uses them: Ray sets a task's
            # OMP_NUM_THREADS (so torch's threads) to its CPU reservation, and with 1.0 the engine
            # would run single-threaded and measure that rather than the Ray hop.
            cpus = os.cpu_count() or 1
            config.write(
                f"[cluster]\nnum_replicas = 1\ncpus_per_replica = {cpus}.0\nhealth_check_period_s = 1.0\n"
            )
        self.process = self.serve("--ray", "local", env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("peft-gateway serve --ray local exited")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the Ray gateway did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.send_signal(2)  # SIGINT: the CLI removes the app and stops its Ray instance
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()


def hop_latency_ms(url: str, requests: int = 15) -> float:
    """Median time to the first token of a one-token answer to a two-token prompt, one at a time.

    Prefill and decode are then a few milliseconds, so what differs between direct serving and Ray is
    the hop itself (proxy -> ingress -> replica and back), not the model's work competing with Ray's
    processes for the cores.
    """
    ttfts = sorted(stream_one(url, "smol", 1, prompt="Hi")[0] for _ in range(requests))
    return ttfts[len(ttfts) // 2] * 1000


def measure(gateway: Gateway, label: str, new_tokens: int, levels: tuple[tuple[int, int], ...]) -> list[Row]:
    load_test(gateway.url, ["smol"], 1, 1, 4, f"{label} warm-up")
    hop = hop_latency_ms(gateway.url)
    print(f"{label}: one-token answer to a two-token prompt, median TTFT {hop:.1f} ms", flush=True)
    rows = [Row(f"{label}, hop", 0.0, ttft_ms=hop)]
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
    args = parser.parse_args(argv)
    levels = QUICK_LEVELS if args.quick else LEVELS
    base, adapters = ensure_smollm2_shaped()
    with Gateway(base, adapters, dtype=args.dtype) as direct:
        direct.preload("smol")
        direct_rows = measure(direct, "direct", args.new_tokens, levels)
    with RayGateway(base, adapters, dtype=args.dtype) as through_ray:
        through_ray.preload("smol")
        ray_rows = measure(through_ray, "through Ray", args.new_tokens, levels)
    print("| clients | direct tok/s | Ray tok/s | ratio | direct TTFT ms | Ray TTFT ms | added TTFT ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    direct_hop, ray_hop = direct_rows.pop(0), ray_rows.pop(0)
    assert direct_hop.ttft_ms is not None and ray_hop.ttft_ms is not None
    print(
        f"| hop (1-token answer, median of 15) | | | | {direct_hop.ttft_ms:.0f} | {ray_hop.ttft_ms:.0f} | "
        f"{ray_hop.ttft_ms - direct_hop.ttft_ms:+.0f} |"
    )
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
                "direct": [asdict(r) for r in [direct_hop, *direct_rows]],
                "ray": [asdict(r) for r in [ray_hop, *ray_rows]],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
