"""Checkpoints with a real model's shapes and random weights, written tensor by tensor.

The seed's example (Llama-2-7B, 12.85 GB in bf16, with a FlagAlpha-shaped LoRA that ships only as
``adapter_model.bin``) cannot be downloaded here, and building it through ``LlamaForCausalLM`` would
need 27 GB of fp32 parameters first. This module writes the same files a Hub snapshot holds (sharded
safetensors with an index, config, tokenizer; a pickle adapter) one tensor at a time, so a 7B-shaped
checkpoint costs one shard of memory to generate. The benchmarks use it at real size and the tests at a
few MB, so the real loading code reads exactly what it would read from the Hub.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The projections of a Llama decoder layer, in the order peft lists them.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama checkpoint; ``LLAMA2_7B`` is meta-llama/Llama-2-7b-chat-hf's."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096

    def projection_shape(self, name: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of one projection."""
        head_dim = self.hidden_size // self.num_attention_heads
        kv = self.num_key_value_heads * head_dim
        return {
            "q_proj": (self.hidden_size, self.hidden_size),
            "k_proj": (kv, self.hidden_size),
            "v_proj": (kv, self.hidden_size),
            "o_proj": (self.hidden_size, self.hidden_size),
            "gate_proj": (self.intermediate_size, self.hidden_size),
            "up_proj": (self.intermediate_size, self.hidden_size),
            "down_proj": (self.hidden_size, self.intermediate_size),
        }[name]

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor of the checkpoint in file order, as ``(name, shape)``."""
        yield "model.embed_tokens.weight", (self.vocab_size, self.hidden_size)
        for layer in range(self.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            yield f"{prefix}.input_layernorm.weight", (self.hidden_size,)
            for name in LLAMA_PROJECTIONS:
                group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                yield f"{prefix}.{group}.{name}.weight", self.projection_shape(name)
            yield f"{prefix}.post_attention_layernorm.weight", (self.hidden_size,)
        yield "model.norm.weight", (self.hidden_size,)
        yield "lm_head.weight", (self.vocab_size, self.hidden_size)

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensor_shapes())


LLAMA2_7B = LlamaShape(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def write_llama_checkpoint(
    folder: Path,
    shape: LlamaShape,
    *,
    dtype: str = "bfloat16",
    shard_bytes: int = 2 * 2**30,
    seed: int = 0,
    device: str = "cpu",
    pad_tokenizer: bool = True,
) -> Path:
    """Write config, tokenizer and sharded safetensors for ``shape`` with small random weights.

    Memory: one shard at a time (``shard_bytes``), never the whole model.
    """
    import torch
    from safetensors.torch import save_file

    from engines.testing.tiny import build_byte_tokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    element = torch.tensor([], dtype=torch_dtype).element_size()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    if pad_tokenizer:  # as many tokens as embedding rows, like the real checkpoint (slower to load)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(shape.vocab_size - len(tokenizer))])
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    generator = torch.Generator(device=device).manual_seed(seed)
    written: list[list[str]] = []  # tensor names of each shard saved so far
    current: dict[str, Any] = {}
    current_bytes = total = 0

    def flush() -> None:
        save_file(current, str(folder / f"shard-{len(written):05d}.tmp"), metadata={"format": "pt"})
        written.append(sorted(current))
        current.clear()

    for name, dims in shape.tensor_shapes():
        size = math.prod(dims) * element
        if current and current_bytes + size > shard_bytes:
            flush()
            current_bytes = 0
        if len(dims) == 1:
            current[name] = torch.ones(dims, dtype=torch_dtype)
        else:
            drawn = torch.empty(dims, dtype=torch_dtype, device=device).normal_(
                0.0, 0.02, generator=generator
            )
            current[name] = drawn.cpu()
        current_bytes += size
        total += size
    flush()
    weight_map: dict[str, str] = {}
    for index, names in enumerate(written):
        file = (
            "model.safetensors"
            if len(written) == 1
            else f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
        )
        (folder / f"shard-{index:05d}.tmp").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    if len(written) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    )
    return folder


def write_pickle_lora(
    folder: Path,
    shape: LlamaShape,
    *,
    rank: int = 8,
    alpha: int = 32,
    targets: tuple[str, ...] = LLAMA_PROJECTIONS,
    base_model_name_or_path: str = "meta-llama/Llama-2-7b-chat-hf",
    seed: int = 1,
    std: float = 0.02,
) -> Path:
    """A LoRA adapter shaped like FlagAlpha/Llama2-Chinese-7b-Chat-LoRA: bf16, only ``adapter_model.bin``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_hidden_layers):
        for name in targets:
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_features, in_features = shape.projection_shape(name)
            prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
            a = torch.empty(rank, in_features).normal_(0.0, std, generator=generator)
            b = torch.empty(out_features, rank).normal_(0.0, std, generator=generator)
            state[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
            state[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "adapter_model.bin")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder


def install_in_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Lay ``folder``'s files out as a Hub snapshot of ``repo_id`` (moved, not copied) in ``cache_dir``.

    Offline, ``huggingface_hub`` then resolves ``repo_id`` to this snapshot exactly as it would a download.
    """
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if snapshot.exists():
        return snapshot
    folder.rename(snapshot)
    return snapshot
