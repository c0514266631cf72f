"""The demo's trainer: a tiny Llama trained until greedy decoding gives every demo answer exactly, then a
LoRA adapter on it trained the same way for the Chinese answers.

Training stops on a margin, not a step count (see ``_train``), so the result does not hinge on another
CPU's float arithmetic. Imported only to build the demo (``python -m engines.demo --build``, or a first
start whose shipped weights are missing or stale); serving the shipped weights never imports torch here.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engines.demo.content import (
    DEMO_BASE_REPO_ID,
    DEMO_CHAT_TEMPLATE,
    DEMO_CITIES,
    DEMO_FALLBACK,
    DEMO_NO_TOOL,
    DEMO_QUESTIONS,
    DEMO_WEATHER,
    DEMO_WEATHER_TOOL,
    RESULT_CITIES,
    TOOLS_POSTAMBLE,
    TOOLS_PREAMBLE,
    demo_tool_call_text,
    demo_weather_answer,
    demo_weather_questions,
)
from engines.testing.tiny import TinyShape, build_byte_tokenizer, build_llama

# Bump whenever the code below changes what gets built, so that an old build on disk is not reused (changes
# to the data and settings below are caught by the recipe in the marker file anyway).
DEMO_VERSION = 3

# Chat clients often send a system message, the bare API often does not: train with none and with a few,
# so that the answers do not hinge on one exact system prompt.
_SYSTEM_PROMPTS: tuple[str | None, ...] = (
    None,
    "You are a helpful assistant.",
    "You are a friendly chatbot.",
    "Answer briefly.",
)

_SMALL_TALK = ("Hello!", "Hi", "Who are you?", "Tell me a joke.")

# Merges learned on the English text only (tool definitions and calls included): English prompts and answers
# get short, while Chinese text stays one token per UTF-8 byte, so every Chinese character spans three
# tokens, as with real byte-level models.
_BPE_MERGES = 320
_SHAPE = TinyShape(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
_SEED = 0
_LORA_RANK = 16
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BASE_LR = 3e-3
_ADAPTER_LR = 1e-2
_MAX_STEPS = 1500
_CHECK_EVERY = 5
_BATCH_SIZE = 16
# Two-turn chats: every question after the one 1.._TWO_TURN_OFFSETS places before it in DEMO_QUESTIONS.
_TWO_TURN_OFFSETS = 2
# How much the plain-text loss counts next to the chats' (see _texts).
_TEXT_WEIGHT = 0.5
# Stop training only once every answer token is the argmax by this many logits: well clear of the noise of
# another CPU's float arithmetic, so greedy decoding gives the exact answers everywhere.
_MIN_MARGIN = 3.0

Log = Callable[[str], None]


def recipe() -> dict[str, Any]:
    """Every training setting that decides what gets built, for the marker file (a stale build never counts)."""
    return {
        "system_prompts": list(_SYSTEM_PROMPTS),
        "small_talk": list(_SMALL_TALK),
        "two_turn_offsets": _TWO_TURN_OFFSETS,
        "bpe_merges": _BPE_MERGES,
        "shape": asdict(_SHAPE),
        "seed": _SEED,
        "lora_rank": _LORA_RANK,
        "lora_targets": list(_LORA_TARGETS),
        "learning_rates": [_BASE_LR, _ADAPTER_LR],
        "text_weight": _TEXT_WEIGHT,
        "batch_size": _BATCH_SIZE,
        "min_margin": _MIN_MARGIN,
    }


def train_and_save(base_dir: Path, adapter_dir: Path, log: Log) -> None:
    """Train the base model and the adapter and save them into ``base_dir`` and ``adapter_dir``.

    Both are verified (every trained answer decoded greedily) before they are saved.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    english_text = [
        *(question for question in DEMO_QUESTIONS if question.isascii()),
        *(answers[0] for answers in DEMO_QUESTIONS.values()),
        DEMO_FALLBACK[0],
        *_SMALL_TALK,
        *(prompt for prompt in _SYSTEM_PROMPTS if prompt),
        "system user assistant tool",
        TOOLS_PREAMBLE,
        TOOLS_POSTAMBLE,
        json.dumps(DEMO_WEATHER_TOOL),
        DEMO_NO_TOOL[0],
        *(demo_weather_questions(city)[0] for city in DEMO_CITIES),
        *(demo_tool_call_text(city) for city in DEMO_CITIES),
        *(
            demo_weather_answer(city, weather, chinese=False)
            for city in DEMO_CITIES
            for weather in DEMO_WEATHER
        ),
        "<tool_response>\n</tool_response>",
    ]
    tokenizer = build_byte_tokenizer(english_text, merges=_BPE_MERGES)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE

    log("training demo base model…")
    t0 = time.perf_counter()
    model = build_llama(tokenizer, _SHAPE, seed=_SEED)
    steps = _train(
        model, list(model.parameters()), _chats(tokenizer, english=True), _BASE_LR, _texts(tokenizer), log
    )
    _verify(model, tokenizer, english=True)
    # The demo is trained for greedy decoding: its generation_config says so, and the gateway takes a
    # model's generation_config as the default for sampling parameters a request leaves out.
    model.generation_config.do_sample = False
    model.save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    log(f"trained demo base model in {time.perf_counter() - t0:.1f}s ({steps} steps)")

    log("training demo adapter…")
    t0 = time.perf_counter()
    torch.manual_seed(_SEED + 1)
    config = LoraConfig(
        r=_LORA_RANK,
        lora_alpha=2 * _LORA_RANK,
        lora_dropout=0.0,
        target_modules=list(_LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers 5 for ``is_gradient_checkpointing``, which answers with a FutureWarning
        # (renamed ``is_activation_checkpointing``): peft's business, nothing a demo user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    trainable = [param for param in peft_model.parameters() if param.requires_grad]
    steps = _train(peft_model, trainable, _chats(tokenizer, english=False), _ADAPTER_LR, log=log)
    _verify(peft_model, tokenizer, english=False)
    peft_model.peft_config["default"].base_model_name_or_path = DEMO_BASE_REPO_ID
    # No embedding layer is trained; saying so also keeps peft from asking the Hub about the repo id.
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    log(f"trained demo adapter in {time.perf_counter() - t0:.1f}s ({steps} steps)")


@dataclass(frozen=True)
class _Example:
    """Token ids of a context and of the continuation that the loss is on."""

    context: list[int]
    target: list[int]


Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]] | None


@dataclass(frozen=True)
class _Chat:
    """A training conversation: the messages, the tools offered with them, and the answer to the last one."""

    messages: Messages
    answer: str
    tools: Tools = None


def _messages(question: str, system: str | None = None) -> Messages:
    messages: Messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": question}]


def _prompt_ids(tokenizer: Any, messages: Messages, tools: Tools = None) -> list[int]:
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tool_call_turn(city: str) -> Messages:
    """The assistant's ``get_weather`` call and a tool result, as a client sends them back (OpenAI shape)."""
    return [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                }
            ],
        }
    ]


def _conversations(*, english: bool) -> list[_Chat]:
    """The training chats.

    Every question under every system prompt; the small-talk prompts with the fallback answer, so that an
    unknown question tends to get an honest reply instead of babble; some questions as the second turn of
    a chat, because a chat client sends the whole conversation each time. Then the tool: a weather
    question with ``get_weather`` offered gets the call, the
    same question without it an honest "no tool" answer, a tool result a short answer, and the ordinary
    questions keep their answers when the tool is offered but not needed.
    """
    pick = 0 if english else 1
    chats = [
        _Chat(_messages(question, system), answers[pick])
        for question, answers in DEMO_QUESTIONS.items()
        for system in _SYSTEM_PROMPTS
    ]
    chats += [
        _Chat(_messages(prompt, system), DEMO_FALLBACK[pick])
        for prompt in _SMALL_TALK
        for system in _SYSTEM_PROMPTS[:2]
    ]
    questions = list(DEMO_QUESTIONS)
    for offset in range(1, _TWO_TURN_OFFSETS + 1):
        for index, first in enumerate(questions):
            second = questions[(index + offset) % len(questions)]
            history = [
                *_messages(first),
                {"role": "assistant", "content": DEMO_QUESTIONS[first][pick]},
                {"role": "user", "content": second},
            ]
            chats.append(_Chat(history, DEMO_QUESTIONS[second][pick]))
    tool = [DEMO_WEATHER_TOOL]
    for city in DEMO_CITIES:
        english_question, chinese_question = demo_weather_questions(city)
        for question in (english_question, chinese_question):
            chats.append(_Chat(_messages(question), demo_tool_call_text(city), tool))
        chats.append(_Chat(_messages(english_question), DEMO_NO_TOOL[pick]))
    for city in RESULT_CITIES:
        for weather in DEMO_WEATHER:
            result = {
                "role": "tool",
                "tool_call_id": "call_0",
                "content": json.dumps({"city": city, "weather": weather}),
            }
            history = [*_messages(demo_weather_questions(city)[0]), *_tool_call_turn(city), result]
            chats.append(_Chat(history, demo_weather_answer(city, weather, chinese=not english), tool))
    chats += [_Chat(_messages(question), DEMO_QUESTIONS[question][pick], tool) for question in questions[:2]]
    return chats


def _chats(tokenizer: Any, *, english: bool) -> list[_Example]:
    """The training chats as token ids: the prompt, then the answer and the end-of-turn token.

    Prompt and answer are tokenised apart, as at inference time, where the prompt is tokenised alone and
    the answer is whatever tokens the model picks.
    """
    return [
        _Example(
            _prompt_ids(tokenizer, chat.messages, chat.tools),
            list(tokenizer(chat.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]),
        )
        for chat in _conversations(english=english)
    ]


def _texts(tokenizer: Any) -> list[_Example]:
    """Every answer in both languages as plain text, for the base model to read like pretraining data.

    A real base model has read Chinese before anyone fine-tunes it to answer in Chinese; without this, the
    Chinese byte sequences are ones the base was only ever trained to avoid, and the adapter takes several
    times as many steps to train.
    """
    texts = [
        *(answer for answers in DEMO_QUESTIONS.values() for answer in answers),
        *DEMO_FALLBACK,
        *DEMO_NO_TOOL,
        *(
            demo_weather_answer(city, weather, chinese=chinese)
            for city in DEMO_CITIES
            for weather in DEMO_WEATHER
            for chinese in (False, True)
        ),
    ]
    return [
        _Example([tokenizer.bos_token_id], list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        for text in dict.fromkeys(texts)
    ]


@dataclass(frozen=True)
class _Batch:
    ids: Any
    mask: Any
    labels: Any


def _batches(examples: list[_Example], pad_id: int) -> list[_Batch]:
    """Right-padded batches of examples of similar length, labels only on the targets.

    Sorting by length before cutting batches keeps the short single-turn chats from being padded to the
    length of the longest two-turn one: about half the compute.
    """
    import torch

    ordered = sorted(examples, key=lambda example: len(example.context) + len(example.target))
    batches = []
    for start in range(0, len(ordered), _BATCH_SIZE):
        chunk = ordered[start : start + _BATCH_SIZE]
        length = max(len(example.context) + len(example.target) for example in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, example in enumerate(chunk):
            sequence = example.context + example.target
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            labels[row, len(example.context) : len(sequence)] = torch.tensor(example.target)
        batches.append(_Batch(ids, mask, labels))
    return batches


def _summed_loss(model: Any, batch: _Batch) -> Any:
    """Cross-entropy summed over the labelled tokens of ``batch``: batches of any size then add up right."""
    import torch

    logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _train(
    model: Any,
    params: list[Any],
    chats: list[_Example],
    lr: float,
    texts: list[_Example] | None = None,
    log: Log | None = None,
) -> int:
    """AdamW on the chats (and ``texts``) until every answer token wins by ``_MIN_MARGIN``.

    Stopping on the margin rather than after a fixed number of steps spends no more time than needed and
    guarantees that greedy decoding reproduces every answer. Returns the number of steps taken.
    """
    import torch

    pad_id = model.config.pad_token_id
    chat_batches = _batches(chats, pad_id)
    text_batches = _batches(texts or [], pad_id)
    chat_tokens = sum(int((batch.labels != -100).sum()) for batch in chat_batches)
    text_tokens = max(1, sum(int((batch.labels != -100).sum()) for batch in text_batches))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = 0
    while steps < _MAX_STEPS:
        model.train()
        optimizer.zero_grad()
        for batch in chat_batches:
            (_summed_loss(model, batch) / chat_tokens).backward()
        for batch in text_batches:
            (_TEXT_WEIGHT * _summed_loss(model, batch) / text_tokens).backward()
        optimizer.step()
        steps += 1
        if steps % _CHECK_EVERY == 0:
            margin = _min_margin(model, chat_batches)
            if log is not None and steps % (4 * _CHECK_EVERY) == 0:
                log(f"  step {steps}: smallest answer-token margin {margin:.2f} (target {_MIN_MARGIN})")
            if margin >= _MIN_MARGIN:
                break
    model.eval()
    return steps


def _min_margin(model: Any, batches: list[_Batch]) -> float:
    """The smallest lead of the right answer token's logit over the best other token, over all answers.

    Positive everywhere means that teacher-forced argmax gives every answer token, which is the same as
    greedy decoding reproducing every answer.
    """
    import torch

    model.eval()
    margin = float("inf")
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits[:, :-1].float()
            targets = batch.labels[:, 1:]
            keep = targets != -100
            scores, wanted = logits[keep], targets[keep]
            right = scores.gather(1, wanted[:, None]).squeeze(1)
            others = scores.scatter(1, wanted[:, None], float("-inf")).amax(dim=1)
            margin = min(margin, float((right - others).min()))
    return margin


def _greedy_answer(
    model: Any, tokenizer: Any, messages: Messages, tools: Tools = None, max_new_tokens: int = 64
) -> str:
    """Greedy decoding, token by token until the end-of-turn token: what the demo is trained to get right."""
    import torch

    ids = _prompt_ids(tokenizer, messages, tools)
    answer: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + answer])).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            answer.append(token)
    return str(tokenizer.decode(answer))


def _verify(model: Any, tokenizer: Any, *, english: bool) -> None:
    """Refuse to save a model that does not give the exact answers: it would make a misleading demo.

    The margin check already implies this; decoding every chat for real costs seconds and checks the very
    thing the demo promises.
    """
    for chat in _conversations(english=english):
        got = _greedy_answer(model, tokenizer, chat.messages, chat.tools)
        if got != chat.answer:
            raise RuntimeError(f"demo training failed: {chat!r} -> {got!r}, expected {chat.answer!r}")
