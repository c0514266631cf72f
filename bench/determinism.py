"""Reproducible greedy answers over HTTP, and what they cost, on the SmolLM2-135M shape (random weights).

Run:  python -m bench.determinism            (a few minutes on 2 cores)
      python -m bench.determinism --quick    (fewer tokens and requests)

For each serving setup: eight different greedy prompts (half of them sharing a long system prompt) sent one
at a time, the same eight again one at a time (the prefix cache now holds them), then all eight at once;
it counts the answers that differ from the first round, by text and by logprobs (bit for bit). Then the
speed of the same setup at 1 and 8 clients (streaming, openai SDK), so the price of a guarantee is a ratio
measured in the same run: bf16 with ``[engine] deterministic = true`` against bf16 without, and float32
(what ``dtype = "auto"`` picks on a CPU where the model fits) against bf16. Results also go to
bench/results/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.cpu_speed import cpu_class, one_and_eight_clients
from bench.models import ensure_smollm2_shaped
from bench.serving import Gateway

SYSTEM = "You are a careful assistant. Answer in one short paragraph and never make things up. " * 8
PROMPTS = [
    *(f"Tell me about the number {i} and why it matters." for i in range(4)),
    *(SYSTEM + f"Question {i}: what is item {i} used for?" for i in range(4)),
]
SETUPS = {
    "float32": ("float32", ""),
    "bf16": ("bfloat16", ""),
    "bf16, deterministic": ("bfloat16", "deterministic = true"),
}


def answer(url: str, prompt: str, new_tokens: int) -> tuple[str, list[float]]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=new_tokens,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    content = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    return choice.message.content or "", [entry.logprob for entry in content]


def all_at_once(url: str, new_tokens: int) -> list[tuple[str, list[float]]]:
    results: list[tuple[str, list[float]] | None] = [None] * len(PROMPTS)

    def one(index: int) -> None:
        results[index] = answer(url, PROMPTS[index], new_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [result for result in results if result is not None]


def differing(first: list[tuple[str, list[float]]], other: list[tuple[str, list[float]]]) -> dict[str, int]:
    pairs = list(zip(first, other, strict=True))
    return {
        "text": sum(a[0] != b[0] for a, b in pairs),
        "logprobs": sum(a[1] != b[1] for a, b in pairs),
    }


def measure(base: Path, adapters: Path, label: str, new_tokens: int, requests: int) -> dict[str, Any]:
    dtype, engine_toml = SETUPS[label]
    with Gateway(base, adapters, dtype=dtype, extra_toml=engine_toml) as gateway:
        gateway.preload("smol")
        first = [answer(gateway.url, prompt, new_tokens) for prompt in PROMPTS]
        again = [answer(gateway.url, prompt, new_tokens) for prompt in PROMPTS]
        together = all_at_once(gateway.url, new_tokens)
        rows = one_and_eight_clients(gateway.url, "smol", label, new_tokens, requests)
    return {
        "setup": label,
        "differ, again one at a time (prefix cache)": differing(first, again),
        "differ, all eight at once": differing(first, together),
        "rows": [asdict(row) for row in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="16 tokens and 8 requests at 8 clients")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "determinism.json")
    args = parser.parse_args(argv)
    new_tokens, requests = (16, 8) if args.quick else (32, 16)
    base, adapters = ensure_smollm2_shaped()
    results = [measure(base, adapters, label, new_tokens, requests) for label in SETUPS]
    speed: dict[str, dict[str, float]] = {
        result["setup"]: {row["name"].split(", ")[-1]: row["tokens_per_second"] for row in result["rows"]}
        for result in results
    }
    print(f"\n{cpu_class()}, {new_tokens} greedy tokens, 8 prompts\n")
    print(
        "| setup | differ again (cache): text / logprobs | differ at once (batch) | 1 client tok/s | 8 clients tok/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for result in results:
        cache = result["differ, again one at a time (prefix cache)"]
        batch = result["differ, all eight at once"]
        rates = speed[result["setup"]]
        print(
            f"| {result['setup']} | {cache['text']}/8 / {cache['logprobs']}/8 | {batch['text']}/8 / "
            f"{batch['logprobs']}/8 | {rates['1 client']:.1f} | {rates['8 clients']:.1f} |"
        )
    bf16, deterministic, fp32 = speed["bf16"], speed["bf16, deterministic"], speed["float32"]
    for clients in ("1 client", "8 clients"):
        print(
            f"{clients}: bf16 deterministic / bf16 {deterministic[clients] / bf16[clients]:.2f}x, "
            f"float32 / bf16 {fp32[clients] / bf16[clients]:.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu_class(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
