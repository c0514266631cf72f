"""Serving benchmark: the real gateway (subprocess, openai SDK streaming) against raw transformers.

Run:  python -m bench.serving            (full run, several minutes on 2 cores)
      python -m bench.serving --quick    (fewer tokens and levels)

Every row is printed as a ratio to a reference measured in the same run on the same model, because
absolute numbers on a shared machine are noise. Results also go to bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped

PROMPT = (
    "You are a helpful assistant. Please explain in a few sentences why the sky appears blue during the "
    "day and red at sunset, for a curious child."
)


@dataclass
class Row:
    name: str
    tokens_per_second: float
    ttft_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- raw transformers reference ---------------------------------------------------------------------


def raw_generate(base: Path, dtype: str, batch: int, new_tokens: int, repeats: int = 2) -> Row:
    """``model.generate`` greedy, fixed length, on the same prompt as the gateway gets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer([text] * batch, return_tensors="pt", add_special_tokens=False)
    best = 0.0
    prefill = float("inf")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model(input_ids=ids["input_ids"][:1], logits_to_keep=1)  # what generate's prefill computes
            prefill = min(prefill, time.perf_counter() - started)
            started = time.perf_counter()
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = max(best, batch * new_tokens / (time.perf_counter() - started))
    return Row(
        f"raw generate {dtype} batch {batch}",
        best,
        extra={"prefill_ms": prefill * 1000, "prompt_tokens": ids["input_ids"].shape[1]},
    )


# --- the gateway ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Preloading goes through an admin route, which is off unless the server has an admin key.
ADMIN_KEY = "bench-admin"


def wait_until_up(
    process: subprocess.Popen[bytes], url: str, what: str, timeout: float = 120, pause: float = 0.2
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``process`` exits, or after ``timeout`` s."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(pause)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")


class Gateway:
    """``peft-gateway serve`` in a subprocess with a generated config."""

    def __init__(
        self,
        base: Path,
        adapter_root: Path,
        *,
        dtype: str,
        extra_toml: str = "",
        adapter_mode: str = "merge",
        quantization: str = "none",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = Path(tempfile.mkdtemp()) / "bench.toml"
        self.config.write_text(
            f'adapter_dirs = ["{adapter_root}"]\nbase_match = "warn"\n'
            f'[server]\nlog_level = "warning"\nadmin_keys = ["{ADMIN_KEY}"]\n[engine]\nmax_batch = 32\nmax_waiting = 256\n{extra_toml}\n'
            f'[models.smol]\nsource = "{base}"\ndtype = "{dtype}"\ncontext_length = 2048\n'
            f'adapter_mode = "{adapter_mode}"\nquantization = "{quantization}"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    def serve(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``peft-gateway serve`` on this config and port, plus ``extra`` arguments."""
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)]
        return subprocess.Popen(
            [*command, "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def __enter__(self) -> Gateway:
        self.process = self.serve()
        wait_until_up(self.process, f"{self.url}/health", "peft-gateway serve")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def rss_mib(self) -> float:
        import psutil

        assert self.process is not None
        return float(psutil.Process(self.process.pid).memory_info().rss / 2**20)

    def pool_mib(self) -> float:
        """Weights the gateway's pool holds, from /metrics (peft_gateway_cache_bytes)."""
        import httpx

        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("peft_gateway_cache_bytes "):
                return float(line.split()[1]) / 2**20
        return float("nan")

    def preload(self, model: str) -> float:
        import httpx

        started = time.perf_counter()
        response = httpx.post(
            f"{self.url}/v1/load_model",
            json={"model": model},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=600,
        )
        response.raise_for_status()
        return time.perf_counter() - started


def stream_one(url: str, model: str, new_tokens: int, prompt: str = PROMPT) -> tuple[float, list[float], int]:
    """One streamed chat request; (ttft, inter-token gaps, completion tokens)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    started = time.perf_counter()
    stamps: list[float] = []
    usage = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return (stamps[0] - started if stamps else float("nan")), gaps, usage


def load_test(
    url: str, models: list[str], concurrency: int, requests: int, new_tokens: int, name: str
) -> Row:
    """``requests`` streamed requests, ``concurrency`` at a time, cycling through ``models``."""
    results: list[tuple[float, list[float], int]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        for index in counter:
            outcome = stream_one(url, models[index % len(models)], new_tokens)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r[2] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    ttfts = [r[0] for r in results]
    return Row(
        name,
        tokens / wall,
        ttft_ms=statistics.median(ttfts) * 1000,
        itl_p50_ms=gaps[len(gaps) // 2] * 1000 if gaps else None,
        itl_p99_ms=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1000 if gaps else None,
        extra={"requests": requests, "concurrency": concurrency, "models": len(set(models))},
    )


# --- the run ----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], reference: dict[str, float]) -> None:
    print(
        f"\n{'scenario':52} {'tok/s':>8} {'vs raw b1':>9} {'vs raw b8':>9} {'TTFT ms':>8} {'ITL p50':>8} {'ITL p99':>8}"
    )
    for row in rows:
        print(
            f"{row.name:52} {row.tokens_per_second:8.1f} {row.tokens_per_second / reference['b1']:8.2f}x "
            f"{row.tokens_per_second / reference['b8']:8.2f}x {fmt(row.ttft_ms):>8} {fmt(row.itl_p50_ms):>8} {fmt(row.itl_p99_ms):>8}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens and levels")
    parser.add_argument("--dtype", default="float32", help="gateway dtype (float32, bfloat16, auto)")
    parser.add_argument("--levels", default="1,4,8,16", help="concurrency levels")
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapter counts")
    parser.add_argument("--skip-adapters", action="store_true")
    parser.add_argument("--adapter-mode", default="multi", help="adapter_mode for the adapter scenarios")
    parser.add_argument("--threads", type=int, default=0, help="[engine] threads (0: torch default)")
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="measure cold prefill (prefix_cache = 0)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving.json")
    args = parser.parse_args(argv)
    new_tokens = 32 if args.quick else 64
    levels = [int(x) for x in args.levels.split(",")]
    base, adapter_root = ensure_smollm2_shaped()

    rows: list[Row] = []
    raw1 = raw_generate(base, "float32", 1, new_tokens)
    raw8 = raw_generate(base, "float32", 8, new_tokens)
    rows += [raw1, raw8]
    reference = {"b1": raw1.tokens_per_second, "b8": raw8.tokens_per_second}
    summary: dict[str, Any] = {
        "raw_prefill_ms": raw1.extra["prefill_ms"],
        "prompt_tokens": raw1.extra["prompt_tokens"],
    }

    engine_toml = f"threads = {args.threads}" + ("\nprefix_cache = 0" if args.no_prefix_cache else "")
    with Gateway(
        base, adapter_root, dtype=args.dtype, extra_toml=engine_toml, adapter_mode=args.adapter_mode
    ) as gateway:
        gateway.preload("smol")
        stream_one(gateway.url, "smol", 4)  # warm-up
        summary["rss_base_mib"] = gateway.rss_mib()
        summary["pool_base_mib"] = gateway.pool_mib()
        for level in levels:
            rows.append(
                load_test(
                    gateway.url,
                    ["smol"],
                    level,
                    max(level * 2, 4) if not args.quick else level,
                    new_tokens,
                    f"gateway {args.dtype} concurrency {level}",
                )
            )
        if not args.skip_adapters:
            for count in [int(x) for x in args.adapters.split(",")]:
                names = [f"smol+lora-{i:02d}" for i in range(count)]
                rss_before = gateway.rss_mib()
                load_seconds = [gateway.preload(name) for name in names]
                summary[f"rss_growth_{count}_adapters_mib"] = gateway.rss_mib() - rss_before
                summary[f"pool_bytes_{count}_adapters_mib"] = gateway.pool_mib()
                summary[f"adapter_load_s_{count}"] = statistics.median(load_seconds)
                rows.append(
                    load_test(
                        gateway.url,
                        names,
                        8,
                        max(count, 8),
                        new_tokens,
                        f"gateway {count} adapters, concurrency 8",
                    )
                )
            names = [f"smol+lora-{i:02d}" for i in range(8)]
            started = time.perf_counter()
            serial_tokens = sum(stream_one(gateway.url, name, new_tokens)[2] for name in names)
            serial = serial_tokens / (time.perf_counter() - started)
            rows.append(Row("gateway 8 adapters, one after another", serial))
            together = load_test(gateway.url, names, 8, 8, new_tokens, "gateway 8 adapters, 8 at once")
            rows.append(together)
            summary["adapters_8_concurrent_vs_serial"] = together.tokens_per_second / serial

    print_table(rows, reference)
    single = next(r for r in rows if r.name.endswith("concurrency 1"))
    print(
        f"\nsingle stream vs raw batch 1: {single.tokens_per_second / reference['b1']:.2f}x (target >= 0.9x)"
    )
    print(
        f"TTFT {fmt(single.ttft_ms)} ms vs raw prefill {summary['raw_prefill_ms']:.1f} ms (target: within 15 ms)"
    )
    eight = next((r for r in rows if r.name.endswith("concurrency 8")), None)
    if eight:
        print(
            f"concurrency 8 vs own single stream: {eight.tokens_per_second / single.tokens_per_second:.2f}x (target >= 4x)"
        )
        print(
            f"concurrency 8 vs raw batch 8: {eight.tokens_per_second / reference['b8']:.2f}x (target >= 0.8x)"
        )
    if "adapters_8_concurrent_vs_serial" in summary:
        print(
            f"8 adapters at once vs one after another: {summary['adapters_8_concurrent_vs_serial']:.2f}x (target >= 3x)"
        )
    print("memory (MiB):", {k: round(v, 1) for k, v in summary.items() if k.startswith(("rss", "pool"))})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "summary": summary, "pid": os.getpid()}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
