"""CPU speed against llama.cpp, as ratios to raw transformers ``generate`` measured in the same run.

Run:  python -m bench.cpu_speed              (3-4 minutes on 2 cores, llama.cpp included)
      python -m bench.cpu_speed --quick      (32 tokens, fewer requests)

      python -m bench.cpu_speed --llama-server PATH/TO/llama-server   (llama.cpp measured beside it)

On the SmolLM2-135M-shaped model, 64 greedy tokens, streaming through the openai SDK to a real
``peft-gateway serve`` subprocess: raw fp32 ``generate`` at batch 1 and 8, then the gateway with
float32 weights, with ``quantization = "int8"``, and int8 with a rank-8 adapter on every request
(served unmerged), each with 1 client and with 8 clients (16 requests). Every row is a ratio to raw
``generate`` at the same batch size, next to llama.cpp's ratios measured the same way on a 2-core Xeon
without native bf16 (issue #15). With ``--llama-server``, llama.cpp's own server runs the same model
(f32 and q8_0 GGUF files from ``python -m bench.gguf``) through the same client in the same run, so
its ratios on this machine are measured rather than carried over. Peak RSS of each server is reported
too. Results also go to bench/results/cpu_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.models import ensure_smollm2_shaped
from bench.serving import Gateway, Row, free_port, load_test, raw_generate, stream_one, wait_until_up

#: llama.cpp's server on a 2-core Xeon without avx512_bf16 (issue #15), as ratios to raw fp32
#: ``generate`` at batch 1 (12.7 tok/s) and batch 8 (50.2 tok/s) measured beside it.
LLAMA_CPP = {
    "f32": {"1 client": 30.5 / 12.7, "8 clients": 124.4 / 50.2},
    "q8_0": {"1 client": 61.4 / 12.7, "8 clients": 143.1 / 50.2},
}


def peak_rss_mib(process: subprocess.Popen[bytes] | None) -> float:
    assert process is not None
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


class LlamaServer:
    """llama.cpp's ``llama-server`` on a GGUF file: 8 parallel slots, continuous batching, all cores."""

    def __init__(self, binary: Path, gguf: Path, context_per_slot: int = 1024) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        threads = str(os.cpu_count() or 1)
        self.command = [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-t",
            threads,
            "-tb",
            threads,
            "-np",
            "8",
            "-c",
            str(8 * context_per_slot),
            "-a",
            "smol",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_up(self.process, f"{self.url}/health", " ".join(self.command))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def one_and_eight_clients(url: str, model: str, label: str, new_tokens: int, requests: int) -> list[Row]:
    """A warm-up request, then 1 client (3 requests) and 8 clients (``requests``), as the issue measured."""
    stream_one(url, model, 4)
    return [
        load_test(url, [model], 1, 3, new_tokens, f"{label}, 1 client"),
        load_test(url, [model], 8, requests, new_tokens, f"{label}, 8 clients"),
    ]


def measure_llama_cpp(
    binary: Path, gguf: Path, kind: str, new_tokens: int, requests: int
) -> tuple[list[Row], float]:
    with LlamaServer(binary, gguf) as server:
        rows = one_and_eight_clients(server.url, "smol", f"llama.cpp {kind}", new_tokens, requests)
        return rows, peak_rss_mib(server.process)


def cpu_class() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "with" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "without"
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "")
    return f"{model or platform.processor()} ({bf16} native bf16)"


def measure(
    base: Path, adapter_root: Path, *, quantization: str, model: str, new_tokens: int, requests: int
) -> tuple[list[Row], float]:
    label = {"none": "float32", "int8": "int8"}[quantization] + (" + adapter" if "+" in model else "")
    with Gateway(
        base, adapter_root, dtype="auto", quantization=quantization, adapter_mode="multi"
    ) as gateway:
        gateway.preload(model)
        rows = one_and_eight_clients(gateway.url, model, f"gateway {label}", new_tokens, requests)
        return rows, peak_rss_mib(gateway.process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="32 tokens and 8 requests at 8 clients")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_speed.json")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary: measure it too")
    parser.add_argument(
        "--gguf-dir",
        type=Path,
        default=Path.home() / ".cache" / "peft-gateway" / "bench" / "gguf",
        help="where python -m bench.gguf wrote the model's f32 and q8_0 files",
    )
    args = parser.parse_args(argv)
    new_tokens = 32 if args.quick else 64
    requests = 8 if args.quick else 16
    base, adapter_root = ensure_smollm2_shaped()

    raw1 = raw_generate(base, "float32", 1, new_tokens)
    raw8 = raw_generate(base, "float32", 8, new_tokens)
    reference = {"1 client": raw1.tokens_per_second, "8 clients": raw8.tokens_per_second}
    results: list[dict[str, Any]] = []

    def record(rows: list[Row], peak: float) -> None:
        for row in rows:
            clients = "1 client" if row.name.endswith("1 client") else "8 clients"
            results.append(
                {**asdict(row), "vs_raw": row.tokens_per_second / reference[clients], "peak_rss_mib": peak}
            )

    if args.llama_server is not None:
        for kind in ("f32", "q8_0"):
            gguf = args.gguf_dir / f"smollm2-135m-shaped-{kind}.gguf"
            record(*measure_llama_cpp(args.llama_server, gguf, kind, new_tokens, requests))
    for quantization, model in (("none", "smol"), ("int8", "smol"), ("int8", "smol+lora-00")):
        record(
            *measure(
                base,
                adapter_root,
                quantization=quantization,
                model=model,
                new_tokens=new_tokens,
                requests=requests,
            )
        )

    print(
        f"\nCPU: {cpu_class()}; raw fp32 generate: {raw1.tokens_per_second:.1f} tok/s (batch 1), "
        f"{raw8.tokens_per_second:.1f} (batch 8)"
    )
    print(f"{'row':40} {'tok/s':>7} {'vs raw':>7} {'TTFT ms':>8} {'peak RSS MiB':>13}")
    for result in results:
        print(
            f"{result['name']:40} {result['tokens_per_second']:7.1f} {result['vs_raw']:6.2f}x "
            f"{result['ttft_ms'] or float('nan'):8.0f} {result['peak_rss_mib']:13.0f}"
        )
    for kind, ratios in LLAMA_CPP.items():
        print(
            f"llama.cpp {kind:5} (issue #15): {ratios['1 client']:.2f}x raw (1 client), {ratios['8 clients']:.2f}x (8)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"cpu": cpu_class(), "raw": reference, "rows": results, "llama_cpp_ratios": LLAMA_CPP}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
