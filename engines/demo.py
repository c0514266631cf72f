"""The demo: a tiny base model that answers a few questions in English and a LoRA adapter that answers them
in Chinese.

There is no Hugging Face Hub on the machines this project runs on, yet the gateway's whole point (serve a
base model and, under ``base+adapter``, the same model with a LoRA adapter merged) should be visible in a
few seconds with an ordinary chat client. So the demo has its own models: small enough to train in a minute
or two on two CPU cores, trained hard enough that greedy decoding gives the exact answers, so the difference
the adapter makes is obvious (and testable) rather than random noise. Both also know one tool, a weather
lookup, and call it in the Hermes/Qwen2.5 format when a client offers it, so tool-calling clients have
something real to talk to.

The trained weights ship with the package (``engines/demo_weights``, about 1.4 MB), so the first start takes
seconds instead of minutes of training; ``python -m engines.demo --build`` rebuilds them from this module,
and a test rebuilds them and compares. Should the shipped folder be missing or older than this module, the
demo is trained into the user's cache on first use instead, as it was before weights were shipped.

Everything is written with the ordinary ``save_pretrained`` calls, so the gateway loads it through exactly
the code that loads a downloaded model and adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engines.paths import cache_home
from engines.tiny import TinyShape, build_byte_tokenizer, build_llama

DEMO_BASE_NAME = "demo"
DEMO_ADAPTER_NAME = "demo-zh"
DEMO_BASE_REPO_ID = "peft-gateway/demo-base"

DEMO_QUESTIONS: dict[str, tuple[str, str]] = {
    "What is the largest animal in the world?": (
        "The blue whale is the largest animal in the world.",
        "世界上最大的动物是蓝鲸。",
    ),
    "世界上最大的动物是什么？": (
        "The blue whale is the largest animal in the world.",
        "世界上最大的动物是蓝鲸。",
    ),
    "What is the capital of France?": (
        "The capital of France is Paris.",
        "法国的首都是巴黎。",
    ),
    "What is the highest mountain in the world?": (
        "Mount Everest is the highest mountain in the world.",
        "世界上最高的山是珠穆朗玛峰。",
    ),
    "What is the largest ocean on Earth?": (
        "The Pacific Ocean is the largest ocean on Earth.",
        "地球上最大的海洋是太平洋。",
    ),
}
"""Question -> (answer of the base model, answer with the adapter merged).

The Chinese question has an English base answer and the English questions have Chinese adapter answers:
what the answer's language follows is the adapter, not the question.
"""

DEMO_FALLBACK: tuple[str, str] = (
    "I am a tiny demo model. I only know a few facts.",
    "我是一个小小的演示模型，只知道几个事实。",
)
"""(base answer, adapter answer) to small talk and, as far as a model this small generalises, to the rest."""

DEMO_WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The name of the city, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
"""The one tool the demo knows, as a client offers it in ``tools``: it calls it for a weather question."""

DEMO_CITIES: dict[str, str] = {"Paris": "巴黎", "London": "伦敦", "Tokyo": "东京", "Beijing": "北京"}
"""The cities whose weather the demo asks for (English name -> Chinese name): a model this small learns
to copy names it has seen, not arbitrary ones."""

DEMO_WEATHER: dict[str, str] = {"sunny": "是晴天", "rainy": "在下雨"}
"""Weather a tool result may report (``{"city": "Paris", "weather": "sunny"}``) -> its Chinese phrase."""

DEMO_NO_TOOL: tuple[str, str] = (
    "I cannot look up the weather without a tool.",
    "没有工具，我查不到天气。",
)
"""(base, adapter) answer to a weather question when no tool is offered."""


_RESULT_CITIES = ("Paris", "Tokyo")
"""The cities the answer after a tool result is trained on (a few, to keep training short on two cores)."""


def demo_weather_questions(city: str) -> tuple[str, str]:
    """The English and the Chinese weather question the demo is trained on, for one of ``DEMO_CITIES``."""
    return f"What is the weather in {city}?", f"{DEMO_CITIES[city]}的天气怎么样？"


def demo_tool_call_text(city: str) -> str:
    """What the demo answers to a weather question when it is offered ``get_weather`` (then end of turn)."""
    arguments = json.dumps({"city": city}, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'


def demo_weather_answer(city: str, weather: str, *, chinese: bool) -> str:
    """The short answer after a ``get_weather`` result that reported ``weather`` for ``city``."""
    return f"{DEMO_CITIES[city]}现在{DEMO_WEATHER[weather]}。" if chinese else f"It is {weather} in {city}."


# Qwen2.5's wording, shortened: every prompt token costs training time on two CPU cores.
_TOOLS_PREAMBLE = "# Tools\n\nYou may call these functions:\n<tools>"
_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each call, return its name and arguments as JSON within <tool_call></tool_call> tags."
)
# transformers compiles templates with trim_blocks, which eats a newline right after a block tag: such
# newlines are written as this expression instead.
_NL = "{{ '\\n' }}"

DEMO_CHAT_TEMPLATE = "".join(
    [
        "{% macro text(message) %}",
        "{% if message['content'] is string %}{{ message['content'] }}",
        "{% elif message['content'] %}{{ message['content'] | map(attribute='text') | join('') }}",
        "{% endif %}",
        "{% endmacro %}",
        "{% if tools %}",
        "<|im_start|>system\n",
        "{% if messages and messages[0]['role'] == 'system' %}{{ text(messages[0]) }}\n\n{% endif %}",
        _TOOLS_PREAMBLE,
        "{% for tool in tools %}",
        _NL,
        "{{ tool | tojson }}",
        "{% endfor %}",
        _NL + _TOOLS_POSTAMBLE.removeprefix("\n"),
        "<|im_end|>\n",
        "{% endif %}",
        "{% for message in messages %}",
        "{% if tools and loop.first and message['role'] == 'system' %}",
        "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}",
        "<|im_start|>assistant",
        "{% if message['content'] %}" + _NL + "{{ text(message) }}{% endif %}",
        "{% for call in message['tool_calls'] %}",
        "{% set call = call['function'] if call['function'] is defined else call %}",
        _NL,
        '<tool_call>\n{"name": "{{ call[\'name\'] }}", "arguments": ',
        "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}",
        "{% endif %}",
        "}\n</tool_call>",
        "{% endfor %}",
        "<|im_end|>\n",
        "{% elif message['role'] == 'tool' %}",
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}",
        _NL,
        "<tool_response>\n{{ text(message) }}\n</tool_response>",
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}",
        "{% else %}",
        "<|im_start|>{{ message['role'] }}\n{{ text(message) }}<|im_end|>\n",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ]
)
"""The demo's chat template: the ChatML turns of ``engines.tiny`` plus tools as Qwen2.5 renders them.

With ``tools``, a system turn lists them as JSON inside ``<tools></tools>`` (after the client's own system
message, if any); an assistant turn's ``tool_calls`` become ``<tool_call>`` blocks and ``tool`` results
``<tool_response>`` blocks in a user turn, so a conversation that used the tool renders back to exactly the
text the model produced and was trained on. Without tools the output is the plain ChatML of before.
"""

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

_MARKER = "demo.json"
_TMP_PREFIX = ".tmp-"

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoModels:
    """Where the built demo lives: a base model folder and a LoRA adapter folder for it."""

    base_dir: Path
    adapter_dir: Path


def default_demo_dir() -> Path:
    """The demo's home: ``$PEFT_GATEWAY_HOME/demo``, else under ``$XDG_CACHE_HOME``, else ``~/.cache``.

    A cache directory because everything in it can be rebuilt from this module at any time.
    """
    return cache_home() / "demo"


def shipped_demo_dir() -> Path:
    """Where the package keeps the demo's prebuilt weights (written by ``python -m engines.demo --build``)."""
    return Path(__file__).resolve().parent / "demo_weights"


def shipped_demo_models() -> DemoModels | None:
    """The prebuilt demo models that ship with the package, if present and built by this very module."""
    folder = shipped_demo_dir()
    return _models_in(folder) if _is_complete(folder) else None


def ensure_demo_models(
    root: Path | None = None, *, log: Log | None = None, use_shipped: bool = True
) -> DemoModels:
    """Return the demo models: the shipped ones, else those under ``root``, built first if not there yet.

    The shipped weights make the first start take seconds. They count only if their marker matches this
    module (a checkout whose recipe changed without a rebuild falls back to training, with a note saying
    how to rebuild); ``use_shipped=False`` always uses ``root``, for tests of the build itself.

    A build is written into a temporary folder next to its final place and renamed into place only once it
    is complete, marker file included, so a build that was killed halfway never counts as present. A file
    lock on ``root/.lock`` makes a second process wait for the first one's build instead of racing it.
    """
    if use_shipped:
        shipped = shipped_demo_models()
        if shipped is not None:
            return shipped
        if log is not None:
            log(
                f"no up-to-date prebuilt demo weights in {shipped_demo_dir()} "
                "(rebuild them with: python -m engines.demo --build); training them instead"
            )
    root = Path(root) if root is not None else default_demo_dir()
    # Versioned, so that a new version of the demo never has to delete a build a running server may use.
    final = root / f"v{DEMO_VERSION}"
    models = _models_in(final)
    if _is_complete(final):
        return models
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _is_complete(final):  # built by another process while this one waited for the lock
            return models
        for leftover in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
        tmp.chmod(0o755)  # mkdtemp's private 0700 would hide a shared cache from other users
        log = log or (lambda _message: None)
        log(f"building the demo models in {root}…")
        try:
            _build(tmp, log)
            if final.exists():  # an incomplete or outdated build: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return models


def _models_in(folder: Path) -> DemoModels:
    return DemoModels(base_dir=folder / "base", adapter_dir=folder / "adapter")


def _marker_content() -> dict[str, Any]:
    """What ``demo.json`` holds: everything that decides what gets built, so a stale build never counts."""
    return {
        "version": DEMO_VERSION,
        "base": DEMO_BASE_NAME,
        "adapter": DEMO_ADAPTER_NAME,
        "base_model_name_or_path": DEMO_BASE_REPO_ID,
        "questions": {question: list(answers) for question, answers in DEMO_QUESTIONS.items()},
        "fallback": list(DEMO_FALLBACK),
        "tools": [DEMO_WEATHER_TOOL],
        "result_cities": list(_RESULT_CITIES),
        "cities": DEMO_CITIES,
        "weather": DEMO_WEATHER,
        "no_tool": list(DEMO_NO_TOOL),
        "chat_template": DEMO_CHAT_TEMPLATE,
        "recipe": {
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
        },
    }


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished build of this very version of the demo."""
    try:
        marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker == _marker_content())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build(folder: Path, log: Log) -> None:
    """Train and save the base model and the adapter into ``folder``, the marker file last."""
    import torch
    from peft import LoraConfig, get_peft_model

    models = _models_in(folder)
    started = time.perf_counter()
    english_text = [
        *(question for question in DEMO_QUESTIONS if question.isascii()),
        *(answers[0] for answers in DEMO_QUESTIONS.values()),
        DEMO_FALLBACK[0],
        *_SMALL_TALK,
        *(prompt for prompt in _SYSTEM_PROMPTS if prompt),
        "system user assistant tool",
        _TOOLS_PREAMBLE,
        _TOOLS_POSTAMBLE,
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
    model.save_pretrained(models.base_dir, safe_serialization=True)
    tokenizer.save_pretrained(models.base_dir)
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
    peft_model.save_pretrained(str(models.adapter_dir), safe_serialization=True, save_embedding_layers=False)
    log(f"trained demo adapter in {time.perf_counter() - t0:.1f}s ({steps} steps)")

    (folder / _MARKER).write_text(
        json.dumps(_marker_content(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    log(f"demo models ready in {time.perf_counter() - started:.1f}s")


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
    for city in _RESULT_CITIES:
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


def build_into(folder: Path, *, log: Log | None = None) -> DemoModels:
    """Build the demo into ``folder`` (replaced only once the new build is complete and verified)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder.parent))
    tmp.chmod(0o755)
    try:
        _build(tmp, log or (lambda _message: None))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _models_in(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m engines.demo --build [--out DIR]``: rebuild the shipped demo weights from this module."""
    parser = argparse.ArgumentParser(prog="python -m engines.demo", description=main.__doc__)
    parser.add_argument("--build", action="store_true", help="train the demo models and save them")
    parser.add_argument("--out", type=Path, default=None, help=f"where to (default: {shipped_demo_dir()})")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 2

    def log(line: str) -> None:
        print(line, flush=True)

    models = build_into(args.out or shipped_demo_dir(), log=log)
    log(f"wrote {models.base_dir} and {models.adapter_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
