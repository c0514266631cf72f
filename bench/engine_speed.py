"""Engine speed benchmark: fp32 vs bf16, transformers forward vs the lean step vs compiled, shared prefix.

Run:  python -m bench.engine_speed            (about 10 minutes on 2 cores)
      python -m bench.engine_speed --quick    (fewer tokens, no compiled row)

Speed rows run the real gateway in a subprocess (the engine thread is then the only thread doing torch
work, as in production) driven by the openai SDK, with one and eight concurrent streams. Each row is a
ratio to raw transformers fp32 ``generate`` measured in the same run on the same SmolLM2-135M-shaped
model. The compiled row is the lean step under ``torch.compile``, timed in-process against the same
step eager. llama.cpp's server on this machine class is quoted as the outside reference: 80 tokens/s for
one stream and 195 with eight clients, i.e. about 3.5x raw fp32 per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped
from bench.serving import PROMPT, Gateway, Row, load_test, raw_generate, stream_one

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


def gateway_rows(
    base: Path, adapter_root: Path, dtype: str, lean: bool, new_tokens: int, quick: bool
) -> list[Row]:
    """One and eight concurrent streams; prefix reuse off so every request prefills, as raw generate does."""
    engine = "transformers forward" if not lean else "lean step"
    toml = f"lean_decode = {str(lean).lower()}\nprefix_cache = 0"
    rows = []
    with Gateway(base, adapter_root, dtype=dtype, extra_toml=toml) as gateway:
        gateway.preload("smol")
        stream_one(gateway.url, "smol", 4)  # warm-up
        for clients in (1, 8):
            requests = clients * (1 if quick else 2)
            name = f"gateway {dtype}, {engine}, {clients} client{'s' if clients > 1 else ''}"
            rows.append(load_test(gateway.url, ["smol"], clients, requests, new_tokens, name))
    return rows


def prefix_rows(base: Path, adapter_root: Path, dtype: str, prefix_tokens: int = 500) -> list[Row]:
    """TTFT for a prompt whose first ``prefix_tokens`` tokens were seen before, with and without reuse."""
    system = ("Shared system prompt sentence number one. " * 200)[:prefix_tokens]  # byte tokenizer
    rows = []
    for reuse in (False, True):
        toml = "" if reuse else "prefix_cache = 0"
        with Gateway(base, adapter_root, dtype=dtype, extra_toml=toml) as gateway:
            gateway.preload("smol")
            stream_one(gateway.url, "smol", 1, system + " first question?")  # fills the prefix cache
            ttfts = [stream_one(gateway.url, "smol", 1, system + f" question {i}?")[0] for i in range(3)]
        name = f"gateway {dtype} shared {prefix_tokens}-token prefix, reuse {'on' if reuse else 'off'}"
        rows.append(Row(name, 0.0, ttft_ms=1000 * sorted(ttfts)[1]))
    return rows


def compiled_rows(base: Path, dtype: str, steps: int = 40) -> list[Row]:
    """The lean step eager and under ``torch.compile`` (dynamic shapes), one row, in this process.

    Best case for the compiler: the K/V buffers are sized once, so only the cache length changes.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from engines.forward.kvcache import BatchKVCache
    from engines.forward.lean import LeanDecoder
    from engines.forward.run import decode_kernels

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).eval()
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None
    compiled = torch.compile(decoder.forward, dynamic=True)

    def decode(forward: Any, count: int) -> float:
        kv = BatchKVCache.for_model(model, rows=1, columns=1000)
        prefill = DynamicCache()
        model(input_ids=torch.arange(40).unsqueeze(0) + 100, cache=prefill, use_cache=True)
        kv.add_row(prefill)
        ids = torch.tensor([[5]])
        started = time.perf_counter()
        for _ in range(count):
            with decode_kernels(model.dtype, "cpu", 1):
                forward(ids, kv.position_ids(), None, kv.length, kv.keys, kv.values)
            kv.advance()
        return (time.perf_counter() - started) / count

    with torch.inference_mode():
        started = time.perf_counter()
        decode(compiled, 3)
        compile_seconds = time.perf_counter() - started
        eager = min(decode(decoder.forward, steps) for _ in range(2))
        fast = min(decode(compiled, steps) for _ in range(2))
    extra = {"compile_s": compile_seconds}
    return [
        Row(f"lean step {dtype} eager, 1 row, in-process", 1 / eager, extra=extra),
        Row(f"lean step {dtype} torch.compile, 1 row, in-process", 1 / fast, extra=extra),
    ]


def stall_rows(base: Path, dtype: str, long_prompt_tokens: int = 1500) -> list[Row]:
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
        name = (
            f"engine {dtype} worst gap of 4 streams, {long_prompt_tokens}-token prompt, prefill_chunk {chunk}"
        )
        rows.append(Row(name, 0.0, ttft_ms=worst * 1000))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens, no compiled row, no stall rows")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_speed.json")
    args = parser.parse_args(argv)
    new_tokens = 32 if args.quick else 64
    dtypes = args.dtypes.split(",")
    base, adapter_root = ensure_smollm2_shaped(adapters=0)
    adapter_root.mkdir(parents=True, exist_ok=True)  # the gateway config lists it as an adapter folder
    raw1 = raw_generate(base, "float32", 1, new_tokens)
    raw8 = raw_generate(base, "float32", 8, new_tokens)
    reference = {1: raw1.tokens_per_second, 8: raw8.tokens_per_second}
    rows = [raw1, raw8, *(raw_generate(base, d, 1, new_tokens) for d in dtypes if d != "float32")]
    for dtype in dtypes:
        for lean in (False, True):
            rows += gateway_rows(base, adapter_root, dtype, lean, new_tokens, args.quick)
    if not args.quick:
        rows += compiled_rows(base, dtypes[-1])
    for dtype in dtypes:
        rows += prefix_rows(base, adapter_root, dtype)
    if not args.quick:
        rows += stall_rows(base, dtypes[0])
    print(f"\n{'scenario':66} {'tok/s':>8} {'vs raw fp32':>11} {'TTFT/gap ms':>11}")
    for row in rows:
        clients = 8 if ("8 client" in row.name or "batch 8" in row.name) else 1
        tps = row.tokens_per_second
        ratio = f"{tps / reference[clients]:10.2f}x" if tps else "-"
        gap = f"{row.ttft_ms:11.1f}" if row.ttft_ms is not None else f"{'-':>11}"
        print(f"{row.name:66} {tps:8.1f} {ratio:>11} {gap}")
    print()
    for dtype in dtypes:
        off = next((r.ttft_ms for r in rows if f"{dtype} shared" in r.name and "reuse off" in r.name), None)
        on = next((r.ttft_ms for r in rows if f"{dtype} shared" in r.name and "reuse on" in r.name), None)
        if off and on:
            print(f"{dtype} shared-prefix TTFT with reuse: {on / off:.2f}x of recomputing (target <= 0.3x)")
    default = "bfloat16" if "bfloat16" in dtypes else dtypes[-1]
    one = next(r for r in rows if r.name == f"gateway {default}, lean step, 1 client")
    eight = next(r for r in rows if r.name == f"gateway {default}, lean step, 8 clients")
    print(
        f"{default} lean step, one stream: {one.tokens_per_second / reference[1]:.2f}x raw fp32 (target >= 2x)"
    )
    print(
        f"{default} lean step, eight clients: {eight.tokens_per_second / reference[8]:.2f}x raw fp32 batch 8 "
        "(target >= 1.6x)"
    )
    print(
        f"llama.cpp reference (quoted, same machine class): {LLAMA_CPP}; "
        f"raw fp32 here: b1 {reference[1]:.1f}, b8 {reference[8]:.1f} tok/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "reference": reference}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
