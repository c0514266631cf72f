"""Small, self-made models, tokenizers and adapters.

The machine this project is developed and tested on has no access to the Hugging Face Hub, so the
demo, the tests and the benchmarks build their models here instead of downloading them. Everything is
saved with the ordinary ``save_pretrained`` calls so that the gateway's real loading code reads it exactly
as it would read a downloaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ text }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")


def build_byte_tokenizer(corpus: list[str] | None = None, merges: int = 0) -> Any:
    """A byte-level BPE tokenizer: 256 byte symbols, the chat special tokens, optional learned merges.

    Without merges every UTF-8 byte is its own token, so a Chinese character spans three tokens: exactly
    the case that streaming must decode without ever emitting a replacement character.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if corpus and merges:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=len(alphabet) + merges,
            initial_alphabet=alphabet,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer)
    else:
        vocab = {symbol: index for index, symbol in enumerate(alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of a Llama-architecture model; the defaults make a model of a few hundred KB."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


SMOLLM2_135M_SHAPE = TinyShape(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
)


def build_llama(tokenizer: Any, shape: TinyShape = TinyShape(), seed: int = 0) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``shape`` for ``tokenizer``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Default init gives near-uniform logits; a larger scale makes greedy output depend on the weights,
    # so that an adapter visibly changes what comes out.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    return model.eval()


def save_tiny_base(folder: Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Write a random tiny base model and its byte tokenizer to ``folder`` (safetensors)."""
    tokenizer = build_byte_tokenizer()
    model = build_llama(tokenizer, shape, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_adapter(
    base_folder: Path,
    folder: Path,
    *,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    rank: int = 4,
    seed: int = 1,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a LoRA adapter for the model in ``base_folder`` whose weights actually change the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    return folder
