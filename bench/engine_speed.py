"""Engine speed benchmark (in-process, no HTTP): fp32 vs bf16, one and eight clients, shared prefix.

Run:  python -m bench.engine_speed [--quick]

Each row is a ratio to raw transformers fp32 ``generate`` measured in the same run on the same
SmolLM2-135M-shaped model. llama.cpp's server on this machine class is quoted as the outside reference:
80 tokens/s for one stream and 195 with eight clients, i.e. about 3.5x raw fp32 per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped
from bench.serving import PROMPT, raw_generate

LLAMA_CPP = {"one stream tok/s": 80, "eight clients tok/s": 195}


async def _stream(
    engine: Any, model: str, prompt: str, new_tokens: int, gaps: list[float] | None = None
) -> tuple[float, int]:
    """One greedy fixed-length generation: (time to first event, tokens); inter-event gaps into ``gaps``."""
    from engines.generation import ChatMessage
    from engines.sampling import SamplingParams

    lease = await engine.acquire(model)
    try:
        request = engine.chat_request(
            lease,
            [ChatMessage(role="user", content=prompt)],
            max_tokens=new_tokens,
            sampling=SamplingParams(temperature=0),
            ignore_eos=True,
        )
        started = last = time.perf_counter()
        first = None
        tokens = 0
        async for event in engine.generate(lease, request):
            now = time.perf_counter()
            if first is None:
                first = now - started
            elif gaps is not None:
                gaps.append(now - last)
            last = now
            tokens = event.completion_tokens
        return first or 0.0, tokens
    finally:
        lease.release()


def engine_rows(
    base: Path, dtype: str, new_tokens: int, clients: list[int], *, compile_mode: str = "off"
) -> list[dict[str, Any]]:
    from engines.catalog import BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits

    catalog = Catalog(bases=(BaseSpec(name="smol", source=str(base), dtype=dtype, context_length=2048),))
    engine = Engine(catalog, EngineLimits(max_batch=32, prefix_cache_bytes=0))
    rows = []
    try:

        async def run() -> None:
            await _stream(engine, "smol", PROMPT, 4)  # load + warm-up
            for count in clients:
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(_stream(engine, "smol", PROMPT, new_tokens) for _ in range(count))
                )
                wall = time.perf_counter() - started
                rows.append(
                    {
                        "name": f"engine {dtype} {count} client(s)",
                        "tokens_per_second": sum(r[1] for r in results) / wall,
                        "ttft_ms": 1000 * sorted(r[0] for r in results)[len(results) // 2],
                    }
                )

        asyncio.run(run())
    finally:
        engine.close()
    return rows


def prefix_rows(base: Path, dtype: str, prefix_tokens: int = 500) -> list[dict[str, Any]]:
    """TTFT for a prompt whose first ``prefix_tokens`` tokens were seen before, with and without reuse."""
    from engines.catalog import BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits

    system = ("Shared system prompt sentence number one. " * 200)[
        : prefix_tokens * 1
    ]  # byte tokenizer: 1 char ~ 1 token
    rows = []
    for reuse in (False, True):
        catalog = Catalog(bases=(BaseSpec(name="smol", source=str(base), dtype=dtype, context_length=2048),))
        engine = Engine(catalog, EngineLimits(prefix_cache_bytes=(512 * 2**20) if reuse else 0))
        try:

            async def run(engine: Engine) -> float:
                await _stream(engine, "smol", system + " first question?", 1)  # fills the prefix cache
                ttfts = [(await _stream(engine, "smol", system + f" question {i}?", 1))[0] for i in range(3)]
                return sorted(ttfts)[1]

            ttft = asyncio.run(run(engine))
        finally:
            engine.close()
        rows.append(
            {
                "name": f"engine {dtype} shared {prefix_tokens}-token prefix, reuse {'on' if reuse else 'off'}",
                "ttft_ms": ttft * 1000,
            }
        )
    return rows


def stall_rows(base: Path, dtype: str, long_prompt_tokens: int = 1500) -> list[dict[str, Any]]:
    """Worst inter-token gap of 4 running streams when a long prompt arrives: chunked vs whole prefill."""
    from engines.catalog import BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits

    rows = []
    for chunk in (4096, 256):
        catalog = Catalog(bases=(BaseSpec(name="smol", source=str(base), dtype=dtype, context_length=2048),))
        engine = Engine(catalog, EngineLimits(prefill_chunk=chunk, prefix_cache_bytes=0))
        try:

            async def run(engine: Engine) -> float:
                await _stream(engine, "smol", PROMPT, 2)  # load + warm-up
                gaps: list[float] = []
                running = [asyncio.create_task(_stream(engine, "smol", PROMPT, 48, gaps)) for _ in range(4)]
                await asyncio.sleep(1.0)
                await _stream(engine, "smol", "x" * long_prompt_tokens, 1)
                await asyncio.gather(*running)
                return max(gaps)

            worst = asyncio.run(run(engine))
        finally:
            engine.close()
        rows.append(
            {
                "name": f"engine {dtype} worst gap of 4 streams, {long_prompt_tokens}-token prompt arrives, prefill_chunk {chunk}",
                "ttft_ms": worst * 1000,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_speed.json")
    args = parser.parse_args(argv)
    new_tokens = 32 if args.quick else 64
    base, _ = ensure_smollm2_shaped(adapters=0)
    raw1 = raw_generate(base, "float32", 1, new_tokens)
    raw8 = raw_generate(base, "float32", 8, new_tokens)
    reference = {1: raw1.tokens_per_second, 8: raw8.tokens_per_second}
    rows: list[dict[str, Any]] = [
        {"name": raw1.name, "tokens_per_second": raw1.tokens_per_second},
        {"name": raw8.name, "tokens_per_second": raw8.tokens_per_second},
    ]
    for dtype in args.dtypes.split(","):
        rows += engine_rows(base, dtype, new_tokens, [1, 8])
    for dtype in args.dtypes.split(","):
        rows += prefix_rows(base, dtype)
    rows += stall_rows(base, args.dtypes.split(",")[0])
    print(f"\n{'scenario':58} {'tok/s':>8} {'vs raw fp32':>11} {'TTFT/gap ms':>11}")
    for row in rows:
        tps = row.get("tokens_per_second")
        clients = 8 if ("8 client" in row["name"] or "batch 8" in row["name"]) else 1
        ratio = f"{tps / reference[clients]:10.2f}x" if tps else "-"
        print(f"{row['name']:58} {tps or 0:8.1f} {ratio:>11} {row.get('ttft_ms', 0):8.1f}")
    off = next((r["ttft_ms"] for r in rows if "reuse off" in r["name"]), None)
    on = next((r["ttft_ms"] for r in rows if "reuse on" in r["name"]), None)
    if off and on:
        print(f"\nshared-prefix TTFT with reuse: {on / off:.2f}x of recomputing (target <= 0.3x)")
    print(
        f"llama.cpp reference (quoted, same machine class): {LLAMA_CPP}; raw fp32 here: b1 {reference[1]:.1f}, b8 {reference[8]:.1f} tok/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "reference": reference}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
