"""Benchmark models: a SmolLM2-135M-shaped Llama with random weights and LoRA adapters for it.

The Hub is not reachable here, so the model is built locally: SmolLM2-135M's shape (30 layers, 576
hidden, 9 heads, 3 KV heads, 49152-token vocabulary) with random weights, which costs the same per token
as the real one. The tokenizer is the byte-level test tokenizer padded to the same vocabulary size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_DIR = Path(os.environ.get("PEFT_GATEWAY_BENCH_DIR", Path.home() / ".cache" / "peft-gateway" / "bench"))
VOCAB = 49152


def ensure_smollm2_shaped(root: Path = BENCH_DIR, adapters: int = 32) -> tuple[Path, Path]:
    """Build (once) the base model and ``adapters`` q/v LoRA adapters; returns (base, adapter_root)."""
    from engines.testing.tiny import SMOLLM2_135M_SHAPE, build_byte_tokenizer, build_llama, save_tiny_adapter

    base = root / "smollm2-135m-shaped"
    adapter_root = root / "adapters"
    if not (base / "config.json").is_file():
        tokenizer = build_byte_tokenizer()
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB - len(tokenizer))])
        model = build_llama(tokenizer, SMOLLM2_135M_SHAPE, seed=0)
        with_init_scale(model)
        tmp = base.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(base)
    for index in range(adapters):
        folder = adapter_root / f"lora-{index:02d}"
        if not (folder / "adapter_config.json").is_file():
            save_tiny_adapter(
                base, folder, rank=8, seed=100 + index, base_model_name_or_path="bench/smollm2-135m-shaped"
            )
    (root / "README.json").write_text(json.dumps({"base": str(base), "adapters": adapters}))
    return base, adapter_root


def with_init_scale(model: object) -> None:
    """Real checkpoints have small weights; keep activations sane for 30 layers of random weights."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
            if "norm" in name:
                param.fill_(1.0)
