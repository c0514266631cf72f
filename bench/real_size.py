"""The seed's example at real size: Llama-2-7B + a FlagAlpha-shaped pickle LoRA, with the default config.

Nothing can be downloaded here, so the script writes (once) a checkpoint with Llama-2-7B-chat's exact
shapes and random bf16 weights (12.85 GB of sharded safetensors) and an adapter shaped like
FlagAlpha/Llama2-Chinese-7b-Chat-LoRA (rank 8, alpha 32, all seven projections, bf16, only
``adapter_model.bin``) into a scratch Hugging Face cache, then serves both from one engine exactly as
``[models.llama-2-chat-7b] source = "meta-llama/Llama-2-7b-chat-hf"`` would, with the default memory
budget, ``dtype = "auto"`` and the given ``adapter_mode``. It reports load time, peak RSS (and GPU
memory), the merge/unmerged decision and its reason, time until the adapter's first token, and
tokens/s for the base and the adapter at 1 and 8 concurrent streams, each beside raw transformers
``generate`` on the same weights in the same run.

    python -m bench.real_size --root /big/scratch                 # CPU, default config
    python -m bench.real_size --root /big/scratch --device cuda --adapter-mode merge multi
    python -m bench.real_size --root /tmp/rs --shape small        # the same path at 50 MB, for a smoke run
    python -m bench.real_size --root /big/scratch --llama-server PATH/TO/llama-server --gguf FILE.gguf
        # llama.cpp's server on the same checkpoint (converted by ``python -m bench.gguf --model``),
        # same prompt, tokens and clients, prompt cache on as the gateway's prefix cache is

Each ``adapter_mode`` runs in its own process, so peak RSS is that configuration's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BASE_REPO = "meta-llama/Llama-2-7b-chat-hf"
ADAPTER_REPO = "FlagAlpha/Llama2-Chinese-7b-Chat-LoRA"
PROMPT = "[INST] 用中文回答：世界上最大的动物是什么？ [/INST]"


def shape_for(name: str) -> Any:
    from engines.testing.shaped import LLAMA2_7B, LlamaShape

    if name == "7b":
        return LLAMA2_7B
    return LlamaShape(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )


def ensure_checkpoints(root: Path, shape_name: str) -> Path:
    """Write the base and the adapter into ``root/<shape>/hub`` unless they are there already."""
    from engines.testing.shaped import install_in_hub_cache, write_llama_checkpoint, write_pickle_lora

    hub = root / shape_name / "hub"
    shape = shape_for(shape_name)
    base_repo = hub / f"models--{BASE_REPO.replace('/', '--')}"
    if not (base_repo / "refs" / "main").is_file():
        started = time.perf_counter()
        folder = write_llama_checkpoint(root / shape_name / "base.tmp", shape, device=random_device())
        install_in_hub_cache(hub, BASE_REPO, folder)
        print(f"wrote the {shape_name} base in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    adapter_repo = hub / f"models--{ADAPTER_REPO.replace('/', '--')}"
    if not (adapter_repo / "refs" / "main").is_file():
        folder = write_pickle_lora(
            root / shape_name / "adapter.tmp", shape, base_model_name_or_path=BASE_REPO
        )
        install_in_hub_cache(hub, ADAPTER_REPO, folder)
    return hub


def random_device() -> str:
    """Draw the random weights on a GPU where there is one: 7B of normal samples take minutes on a CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_scenario(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One configuration in a fresh process (its own peak RSS), as JSON."""
    command = [
        sys.executable,
        "-m",
        "bench.real_size",
        "--root",
        str(args.root),
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--tokens",
        str(args.tokens),
        "--repeats",
        str(args.repeats),
        "--clients",
        *[str(c) for c in args.clients],
        "--quantization",
        args.quantization,
        "--scenario",
        mode,
    ]
    if args.no_raw:
        command.append("--no-raw")
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    sys.stderr.write(output.stderr[-4000:])
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


def peak_rss_gib() -> float:
    """This process's own peak RSS (VmHWM: ru_maxrss would carry a parent's peak across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20


async def stream_rate(engine: Any, model: str, clients: int, tokens: int) -> dict[str, float]:
    """Tokens/s over ``clients`` concurrent greedy streams of ``tokens`` tokens, and the mean TTFT."""
    import asyncio

    from engines.sampling import SamplingParams

    async def one(index: int) -> tuple[int, float]:
        lease = await engine.acquire(model)
        try:
            request = engine.text_request(
                lease,
                PROMPT,
                max_tokens=tokens,
                sampling=SamplingParams(temperature=0.0),
                request_id=f"bench-{index}",
                ignore_eos=True,
            )
            started = time.perf_counter()
            first = 0.0
            count = 0
            async for event in engine.generate(lease, request):
                if event.error:
                    raise RuntimeError(event.error)
                if not first and event.completion_tokens:
                    first = time.perf_counter() - started
                count = event.completion_tokens or count
            return count, first
        finally:
            lease.release()

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": sum(count for count, _ in results) / elapsed,
        "ttft_s": sum(first for _, first in results) / clients,
    }


def raw_generate_rate(model: Any, tokenizer: Any, clients: int, tokens: int) -> float:
    """Raw transformers ``generate`` on the same weights: tokens/s at batch ``clients``."""
    import torch

    device = next(model.parameters()).device
    ids = tokenizer([PROMPT] * clients, return_tensors="pt").to(device)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return clients * tokens / (time.perf_counter() - started)


def scenario(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    from engines.catalog import BaseSpec, Catalog
    from engines.engine import Engine, EngineLimits

    engine = Engine(
        Catalog(
            bases=(
                BaseSpec(
                    name="llama-2-chat-7b",
                    source=BASE_REPO,
                    device=args.device,
                    adapter_mode=args.scenario,
                    quantization=args.quantization,
                ),
            )
        ),
        EngineLimits(),
    )
    budget = engine.budgets.for_device(args.device)
    result: dict[str, Any] = {
        "device": args.device,
        "shape": args.shape,
        "adapter_mode": args.scenario,
        "quantization": args.quantization,
        "budget_gib": round(budget.total / 2**30, 2),
    }
    adapter_model = f"llama-2-chat-7b+{ADAPTER_REPO}"

    async def run() -> None:
        started = time.perf_counter()
        lease = await engine.acquire("llama-2-chat-7b")
        result["base_load_s"] = round(time.perf_counter() - started, 2)
        result["dtype"] = lease.loaded.dtype
        result["dtype_reason"] = lease.loaded.dtype_reason
        result["weights_gib"] = round(lease.loaded.nbytes / 2**30, 2)
        result["rss_after_base_gib"] = round(peak_rss_gib(), 2)
        base_model, tokenizer = lease.loaded.model, lease.loaded.tokenizer
        lease.release()
        await stream_rate(engine, "llama-2-chat-7b", max(args.clients), 4)  # warm-up: kernels, lean step
        started = time.perf_counter()
        adapter_first = await stream_rate(engine, adapter_model, 1, 1)
        result["adapter_ready_s"] = round(time.perf_counter() - started, 2)
        result["adapter_first_token_s"] = round(adapter_first["ttft_s"], 3)
        lease = await engine.acquire(adapter_model)
        result["adapter_serving"] = lease.loaded.serving
        result["adapter_serving_reason"] = lease.loaded.serving_reason
        result["adapter_extra_mib"] = round(lease.loaded.nbytes / 2**20, 1)
        lease.release()
        await stream_rate(engine, adapter_model, max(args.clients), 4)  # warm-up at every batch size
        for clients in args.clients:
            for label, model in (("base", "llama-2-chat-7b"), ("adapter", adapter_model)) * args.repeats:
                rate = await stream_rate(engine, model, clients, args.tokens)
                key = f"{label}_{clients}_tok_s"
                if rate["tokens_per_s"] > result.get(key, 0.0):  # best of the repeats, alternating
                    result[key] = round(rate["tokens_per_s"], 3)
                    result[f"{label}_{clients}_ttft_s"] = round(rate["ttft_s"], 3)
            if not args.no_raw and args.quantization == "none":  # raw generate needs float weights
                raw = raw_generate_rate(base_model, tokenizer, clients, args.tokens)
                result[f"raw_generate_{clients}_tok_s"] = round(raw, 3)
        for clients in args.clients:
            result[f"adapter_vs_base_cost_{clients}"] = round(
                result[f"base_{clients}_tok_s"] / result[f"adapter_{clients}_tok_s"], 3
            )
            if f"raw_generate_{clients}_tok_s" in result:
                result[f"base_vs_raw_{clients}"] = round(
                    result[f"base_{clients}_tok_s"] / result[f"raw_generate_{clients}_tok_s"], 2
                )

    try:
        asyncio.run(run())
    finally:
        engine.close()
    result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    if args.device.startswith("cuda"):
        import torch

        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def llama_cpp_rates(
    binary: Path, gguf: Path, clients: list[int], tokens: int, repeats: int
) -> dict[str, Any]:
    """llama.cpp's server on the same prompt: best tokens/s over ``repeats`` runs per client count, peak RSS.

    Counted as ``stream_rate`` counts the gateway: tokens over the whole request, the repeated prompt
    served from each server's prompt cache after the warm-up.
    """
    import asyncio

    import httpx

    from bench.cpu_speed import LlamaServer, peak_rss_mib

    async def one(client: httpx.AsyncClient, url: str) -> int:
        body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        response = await client.post(f"{url}/v1/completions", json=body, timeout=3600)
        return int(response.raise_for_status().json()["usage"]["completion_tokens"])

    async def rate(url: str, count: int) -> float:
        async with httpx.AsyncClient() as client:
            started = time.perf_counter()
            produced = await asyncio.gather(*(one(client, url) for _ in range(count)))
            return sum(produced) / (time.perf_counter() - started)

    result: dict[str, Any] = {}
    started = time.perf_counter()
    with LlamaServer(binary, gguf, context_per_slot=512) as server:
        result["llama_cpp_start_s"] = round(time.perf_counter() - started, 2)
        asyncio.run(rate(server.url, max(clients)))  # warm-up, and the prompt into every slot's cache
        for count in clients:
            best = max(asyncio.run(rate(server.url, count)) for _ in range(repeats))
            result[f"llama_cpp_{count}_tok_s"] = round(best, 3)
        result["llama_cpp_peak_rss_gib"] = round(peak_rss_mib(server.process) / 1024, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "peft-gateway" / "real-size")
    parser.add_argument("--shape", choices=("7b", "small"), default="7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter-mode", nargs="+", default=["merge"], choices=("merge", "multi", "auto"))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-raw", action="store_true", help="skip raw transformers generate")
    parser.add_argument("--repeats", type=int, default=2, help="alternating base/adapter runs; best kept")
    parser.add_argument(
        "--quantization", default="none", choices=("none", "int8"), help="the base's quantization (int8: CPU)"
    )
    parser.add_argument("--llama-server", type=Path, help="also measure llama.cpp's llama-server on --gguf")
    parser.add_argument("--gguf", type=Path, help="the checkpoint as GGUF (python -m bench.gguf --model)")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hub = args.root / args.shape / "hub"
    os.environ["HF_HUB_CACHE"] = str(hub)
    os.environ["HF_HOME"] = str(args.root / args.shape / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.scenario:
        print(json.dumps(scenario(args)))
        return
    ensure_checkpoints(args.root, args.shape)
    if args.llama_server is not None:
        if args.gguf is None:
            parser.error("--llama-server needs --gguf")
        print(
            json.dumps(llama_cpp_rates(args.llama_server, args.gguf, args.clients, args.tokens, args.repeats))
        )
    for mode in args.adapter_mode:
        print(json.dumps(run_scenario(args, mode), indent=1))


if __name__ == "__main__":
    main()
