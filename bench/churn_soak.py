"""Eviction churn soak: many adapters, a cache that holds three models, bursts of first requests.

Every greedy answer is compared with the same model asked alone in a roomy engine; an answer from the
base or from another adapter counts as wrong. Reports requests, refusals (clean 503s), evictions,
wrong answers and RSS drift, per adapter mode.

    python -m bench.churn_soak --adapters 7 --bursts 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path


def rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


async def answer(engine: object, model: str) -> str:
    from engines.sampling import SamplingParams

    lease = await engine.acquire(model)  # type: ignore[attr-defined]
    try:
        request = engine.text_request(  # type: ignore[attr-defined]
            lease, "churn", max_tokens=12, sampling=SamplingParams(temperature=0)
        )
        return "".join([event.text async for event in engine.generate(lease, request)])  # type: ignore[attr-defined]
    finally:
        lease.release()


async def run_bursts(
    engine: object, models: list[str], expected: dict[str, str], bursts: int, size: int
) -> tuple[dict[str, int], list[float]]:
    """Bursts of ``size`` simultaneous requests; counts of served, refused and wrong, and RSS samples."""
    from engines.errors import Overloaded

    counts = {"served": 0, "refused": 0, "wrong": 0}
    rss = [rss_mib()]
    for burst in range(bursts):
        jobs = [models[(burst * 3 + k) % len(models)] for k in range(size)]
        replies = await asyncio.gather(*(answer(engine, m) for m in jobs), return_exceptions=True)
        for model, reply in zip(jobs, replies, strict=True):
            if isinstance(reply, Overloaded):
                counts["refused"] += 1
            elif isinstance(reply, BaseException):
                raise reply
            else:
                counts["served" if reply == expected[model] else "wrong"] += 1
        if burst == bursts // 10:
            rss.append(rss_mib())  # after warm-up
    rss.append(rss_mib())
    return counts, rss


def main() -> None:
    from engines.catalog import AdapterPolicy, BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits
    from engines.testing.tiny import save_tiny_adapter, save_tiny_base

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=7)
    parser.add_argument("--bursts", type=int, default=100)
    parser.add_argument("--burst-size", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["multi", "auto", "merge"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="churn-"))
    base = save_tiny_base(root / "base")
    for index in range(args.adapters):
        save_tiny_adapter(base, root / "adapters" / f"a{index}", seed=10 + index)
    models = [f"tiny+a{index}" for index in range(args.adapters)]
    results = []
    for mode in args.modes:
        spec = BaseSpec(name="tiny", source=str(base), dtype="float32", adapter_mode=mode)
        catalog = Catalog(
            bases=(spec,), policy=AdapterPolicy(adapter_dirs=(root / "adapters",), base_match="warn")
        )
        roomy = Engine(catalog, EngineLimits(prefix_cache_bytes=0))
        expected = {model: asyncio.run(answer(roomy, model)) for model in models}
        roomy.close()
        tight = Engine(catalog, EngineLimits(max_models=3, prefix_cache_bytes=0))
        counts, rss = asyncio.run(run_bursts(tight, models, expected, args.bursts, args.burst_size))
        tight.close()
        results.append(
            {
                "mode": mode,
                "requests": args.bursts * args.burst_size,
                **counts,
                "evictions": sum(tight.pool.stats.evictions.values()),
                "rss_after_warmup_mib": round(rss[1], 1),
                "rss_drift_mib": round(rss[-1] - rss[1], 1),
            }
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
