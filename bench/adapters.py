"""Adapter benchmark: memory a merged variant adds, and time to first token for a new adapter.

Run:  python -m bench.adapters

On the SmolLM2-135M-shaped model with rank-8 q_proj/v_proj adapters it prints:
- the bytes a merged variant adds, as a ratio of the base and of the targeted weights (target: at most
  the targeted weights + 10%), and the same for unmerged ("multi") adapters;
- process RSS growth for 8 merged variants vs 8 unmerged adapters;
- time to first token for a new adapter on an already-loaded base vs loading base + adapter from scratch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss / 2**20)


async def _first_token(engine: Any, model: str) -> float:
    from engines.generation import ChatMessage
    from engines.sampling import SamplingParams

    started = time.perf_counter()
    lease = await engine.acquire(model)
    try:
        request = engine.chat_request(
            lease,
            [ChatMessage(role="user", content="Hello there!")],
            max_tokens=1,
            sampling=SamplingParams(temperature=0),
        )
        async for _event in engine.generate(lease, request):
            break
    finally:
        lease.release()
    return time.perf_counter() - started


def targeted_bytes(base_model: Any) -> int:
    """Bytes of the q_proj and v_proj weights: what a q/v adapter's merged variant must copy."""
    return sum(
        module.weight.numel() * module.weight.element_size()
        for name, module in base_model.named_modules()
        if name.endswith(("q_proj", "v_proj"))
    )


def run(mode: str, base: Path, adapter_root: Path, count: int) -> dict[str, Any]:
    from engines.catalog import AdapterPolicy, BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits

    catalog = Catalog(
        bases=(BaseSpec(name="smol", source=str(base), dtype="float32", adapter_mode=mode),),
        policy=AdapterPolicy(adapter_dirs=(adapter_root,), base_match="warn"),
    )
    engine = Engine(catalog, EngineLimits(prefix_cache_bytes=0))
    try:

        async def scenario() -> dict[str, Any]:
            scratch = await _first_token(engine, "smol+lora-00")  # base + adapter from nothing
            base_entry = next(e for e in engine.pool.entries() if e.base_key is None)
            rss_before = _rss_mib()
            warm = [await _first_token(engine, f"smol+lora-{i:02d}") for i in range(1, count + 1)]
            rss_after = _rss_mib()
            variants = [e for e in engine.pool.entries() if e.base_key is not None]
            return {
                "mode": mode,
                "base_bytes": base_entry.loaded.nbytes,
                "targeted_bytes": targeted_bytes(base_entry.loaded.model),
                "variant_bytes": sorted(v.loaded.nbytes for v in variants)[len(variants) // 2],
                "ttft_from_scratch_s": scratch,
                "ttft_new_adapter_on_loaded_base_s": sorted(warm)[len(warm) // 2],
                "rss_growth_mib": rss_after - rss_before,
                "adapters": count,
            }

        return asyncio.run(scenario())
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=8, help="adapters loaded onto the warm base")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adapters.json")
    args = parser.parse_args(argv)
    base, adapter_root = ensure_smollm2_shaped(adapters=args.count + 1)
    results = [run(mode, base, adapter_root, args.count) for mode in ("merge", "multi")]
    for r in results:
        print(f"\nadapter_mode = {r['mode']}")
        print(
            f"  variant adds {r['variant_bytes'] / 2**20:.2f} MiB = {r['variant_bytes'] / r['base_bytes']:.3f}x the base "
            f"({r['base_bytes'] / 2**20:.0f} MiB), {r['variant_bytes'] / r['targeted_bytes']:.3f}x the q/v weights "
            f"(target for merge: <= 1.10x)"
        )
        print(f"  RSS growth for {r['adapters']} adapters: {r['rss_growth_mib']:.1f} MiB")
        print(
            f"  TTFT new adapter on loaded base {r['ttft_new_adapter_on_loaded_base_s'] * 1000:.0f} ms vs base+adapter from "
            f"scratch {r['ttft_from_scratch_s'] * 1000:.0f} ms ({r['ttft_new_adapter_on_loaded_base_s'] / r['ttft_from_scratch_s']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
