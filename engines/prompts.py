"""Turning chat messages and text prompts into token ids with the model's own tokenizer and template."""

from __future__ import annotations

import json
from typing import Any

from engines.errors import InvalidGenerationRequest
from engines.generation import ChatMessage
from engines.template_sandbox import (
    DEFAULT_RENDER_LIMITS,
    RenderLimits,
    TemplateLimitExceeded,
    render_template,
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a ``tools`` list (Llama 3, Qwen, Mistral templates do)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in str(t) for t in template.values())
    return isinstance(template, str) and "tools" in template


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
    limits: RenderLimits = DEFAULT_RENDER_LIMITS,
) -> list[int]:
    """Apply the model's chat template (with the generation prompt) and tokenize the result.

    A model without a chat template gets a clear 400 rather than a guessed format: the wrong template
    silently degrades every answer. Tool definitions are rendered only by templates that know them; for
    any other model they are refused rather than dropped. The template runs in a bounded sandbox
    (``engines.template_sandbox``): it is code from whoever published the model or adapter.
    """
    if not has_chat_template(tokenizer):
        raise InvalidGenerationRequest(
            "This model has no chat template, so chat messages cannot be formatted for it; use "
            "/v1/completions with a plain prompt.",
            param="messages",
        )
    if tools and not template_supports_tools(tokenizer):
        raise InvalidGenerationRequest(
            "This model's chat template does not support tools, so 'tools' cannot be given to it.",
            param="tools",
        )
    conversation: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        conversation.append(entry)
    try:
        text = render_template(
            _template_source(tokenizer, tools),
            limits,
            **{
                **dict(getattr(tokenizer, "special_tokens_map", {}) or {}),
                "messages": conversation,
                "tools": tools or None,
                "documents": None,
                "add_generation_prompt": True,
            },
        )
    except TemplateLimitExceeded:
        raise
    except Exception as exc:  # jinja2 raises TemplateError subclasses, templates raise anything
        raise InvalidGenerationRequest(
            f"The model's chat template rejected these messages: {exc}", param="messages"
        ) from exc
    return encode_text(tokenizer, text)


def _template_source(tokenizer: Any, tools: list[dict[str, Any]] | None) -> str:
    """The template text to use, choosing among named templates as transformers does."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        if tools and "tool_use" in template:
            return str(template["tool_use"])
        if "default" in template:
            return str(template["default"])
        raise InvalidGenerationRequest(
            "This model has several chat templates and none is named 'default'.", param="messages"
        )
    return str(template)


def template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as chat templates expect it: ``arguments`` as a mapping, not JSON text.

    Templates render ``arguments | tojson``; given OpenAI's string they would print it quoted and
    escaped, so the model would see its own call in a form it never produced.
    """
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Tokenize text that is already a complete prompt (template output or a completions prompt)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def token_bytes(tokenizer: Any, token_id: int) -> tuple[str, tuple[int, ...]]:
    """The text and the raw bytes of a single token, for logprobs."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    raw: bytes
    if isinstance(piece, str) and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        raw = bytes([int(piece[3:5], 16)])
    elif isinstance(piece, str) and _BYTE_DECODER and all(ch in _BYTE_DECODER for ch in piece):
        raw = bytes(_BYTE_DECODER[ch] for ch in piece)
    else:
        raw = str(tokenizer.decode([token_id])).encode("utf-8")
    return raw.decode("utf-8", errors="replace"), tuple(raw)


def skipped_token_texts(tokenizer: Any) -> frozenset[str]:
    """The texts of the special tokens that decoding with ``skip_special_tokens`` leaves out.

    Generated text is decoded that way, so such a token (an EOS the model emits under ``ignore_eos``)
    adds nothing to the text, and the legacy logprobs' ``text_offset`` must not advance past it. The
    tokenizer's added tokens marked special are what its decoder skips (``<|im_start|>`` among them,
    which ``all_special_tokens`` does not list).
    """
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {str(token.content) for token in added.values() if getattr(token, "special", False)}
    texts.update(str(token) for token in getattr(tokenizer, "all_special_tokens", ()))
    return frozenset(texts)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable symbol that stands for each byte in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


#: Byte-level BPE symbols back to raw bytes.
_BYTE_DECODER = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
