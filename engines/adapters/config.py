"""Reading and validating ``adapter_config.json`` before peft or the gateway acts on any of it.

An adapter's config is untrusted input (anyone can publish a Hub repo), and peft trusts it: an integer
``target_modules``, a ``rank_pattern`` list, a string ``lora_alpha`` or a regex that does not compile
surface as ``TypeError`` / ``re.error`` deep inside peft or the gateway's own code, that is as 500s.
Every field the gateway or peft reads is checked here, with a message naming the adapter and the field,
so each refusal is a 400 (:class:`~engines.errors.AdapterRejected`). Size and nesting are capped before
anything walks the value, because a deeply nested document breaks every recursive consumer
(``json``, ``copy.deepcopy``, peft's dataclass init) with a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from engines.errors import AdapterRejected

#: A real adapter_config.json is a few KiB; a MiB leaves room for long module lists.
MAX_CONFIG_BYTES = 2**20
#: Real configs nest three levels at most (``loftq_config``, ``runtime_config``...).
MAX_DEPTH = 16
#: Longest regex (``target_modules`` as a string, pattern keys) accepted; module names are short.
MAX_PATTERN_LENGTH = 1024
#: Longest list of module names / layer indices accepted.
MAX_LIST_LENGTH = 4096
MAX_STRING_LENGTH = 1024

_BIASES = ("none", "all", "lora_only")
_TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
#: Initialisations that only draw fresh A/B matrices (then overwritten by the saved ones). The others
#: (pissa, olora, corda, eva, loftq...) rewrite the *base* weights at load time, which would change the
#: base shared with every other variant; adapters trained that way must be converted before serving.
_SAFE_INITS = (True, False, "gaussian", "orthogonal")
#: Fields that change the model's structure or pull in other code, refused whenever set.
_MUST_BE_EMPTY = ("megatron_config", "layer_replication", "use_bdlora", "arrow_config", "lora_ga_config")
#: Optional fields that peft builds sub-configs from: a JSON object or null.
_OBJECT_FIELDS = (
    "loftq_config",
    "eva_config",
    "corda_config",
    "runtime_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "auto_mapping",
)
_BOOL_FIELDS = (
    "use_rslora",
    "fan_in_fan_out",
    "inference_mode",
    "use_dora",
    "lora_bias",
    "use_qalora",
    "ensure_weight_tying",
)
_STRING_FIELDS = ("base_model_name_or_path", "revision", "peft_version", "megatron_core")


def _reject(adapter: str, field: str, problem: str) -> AdapterRejected:
    return AdapterRejected(f"Adapter '{adapter}': adapter_config.json field '{field}' {problem}.")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_adapter_config(path: Path, adapter: str, *, max_rank: int | None = None) -> dict[str, Any]:
    """Read ``path`` (size-capped), parse it and :func:`validate_adapter_config` the result."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise AdapterRejected(f"Adapter '{adapter}' has an unreadable adapter_config.json.") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterRejected(
            f"Adapter '{adapter}': adapter_config.json is larger than {MAX_CONFIG_BYTES // 1024} KiB."
        )
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise AdapterRejected(f"Adapter '{adapter}': adapter_config.json is nested too deeply.") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterRejected(f"Adapter '{adapter}' has an unreadable adapter_config.json: {exc}") from exc
    return validate_adapter_config(config, adapter, max_rank=max_rank)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def validate_adapter_config(config: Any, adapter: str, *, max_rank: int | None = None) -> dict[str, Any]:
    """``config`` if it is a LoRA config peft and the gateway can use; :class:`AdapterRejected` otherwise.

    ``adapter`` is the adapter's public name (never a server path): it goes into the message.
    """
    if not isinstance(config, dict):
        raise AdapterRejected(f"Adapter '{adapter}': adapter_config.json is not a JSON object.")
    _check_depth(config, adapter)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        shown = peft_type if isinstance(peft_type, str) and len(peft_type) <= 32 else "unknown"
        raise AdapterRejected(
            f"Adapter '{adapter}' is a PEFT '{shown}' adapter; only LoRA adapters can be served."
        )
    task_type = config.get("task_type")
    if task_type is not None and task_type not in _TASK_TYPES:
        raise _reject(adapter, "task_type", f"is {_show(task_type)}, not one of {', '.join(_TASK_TYPES)}")
    _check_rank(config.get("r"), adapter, "r", max_rank)
    _check_alpha(config.get("lora_alpha", 8), adapter, "lora_alpha")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise _reject(adapter, "lora_dropout", f"must be a number in [0, 1), not {_show(dropout)}")
    for name in _BOOL_FIELDS:
        if name in config and not isinstance(config[name], bool | None):
            raise _reject(adapter, name, f"must be true or false, not {_show(config[name])}")
    if config.get("use_dora"):
        raise AdapterRejected(f"Adapter '{adapter}' uses DoRA, which this gateway does not serve.")
    bias = config.get("bias", "none")
    if bias not in _BIASES:
        raise _reject(adapter, "bias", f"must be one of {', '.join(_BIASES)}, not {_show(bias)}")
    for name in _STRING_FIELDS:
        value = config.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_STRING_LENGTH):
            raise _reject(adapter, name, f"must be a string of at most {MAX_STRING_LENGTH} characters")
    targets = _check_modules(config.get("target_modules"), adapter, "target_modules")
    parameters = _check_string_list(config.get("target_parameters"), adapter, "target_parameters")
    if not targets and not parameters:
        raise AdapterRejected(f"Adapter '{adapter}' names no target_modules.")
    _check_modules(config.get("exclude_modules"), adapter, "exclude_modules")
    _check_string_list(config.get("modules_to_save"), adapter, "modules_to_save")
    _check_patterns(config.get("rank_pattern"), adapter, "rank_pattern", max_rank)
    _check_patterns(config.get("alpha_pattern"), adapter, "alpha_pattern", None)
    _check_layers(config.get("layers_to_transform"), adapter)
    layers_pattern = config.get("layers_pattern")
    if isinstance(layers_pattern, str):
        _check_regex(layers_pattern, adapter, "layers_pattern")
    else:
        for item in _check_string_list(layers_pattern, adapter, "layers_pattern"):
            _check_regex(item, adapter, "layers_pattern")
    init = config.get("init_lora_weights", True)
    if not any(init is safe or (isinstance(init, str) and init == safe) for safe in _SAFE_INITS):
        raise _reject(
            adapter,
            "init_lora_weights",
            f"is {_show(init)}; only true, false, 'gaussian' or 'orthogonal' can be served (PiSSA, OLoRA, "
            "LoftQ... adapters change the base weights: convert them to plain LoRA first)",
        )
    for name in _MUST_BE_EMPTY:
        if config.get(name) not in (None, False, [], {}):
            raise _reject(adapter, name, "is not supported by this gateway (it must be null)")
    for name in _OBJECT_FIELDS:
        if name in config and not isinstance(config[name], dict | None):
            raise _reject(adapter, name, f"must be a JSON object or null, not {_show(config[name])}")
    _check_trainable_tokens(config.get("trainable_token_indices"), adapter)
    invocation = config.get("alora_invocation_tokens")
    if invocation is not None and not _is_int_list(invocation, minimum=0):
        raise _reject(adapter, "alora_invocation_tokens", "must be a list of token ids")
    group = config.get("qalora_group_size", 16)
    if not _is_int(group) or group < 1:
        raise _reject(adapter, "qalora_group_size", f"must be a positive integer, not {_show(group)}")
    return config


def _check_depth(config: dict[str, Any], adapter: str) -> None:
    """Iteratively (so the check itself cannot overflow): no container deeper than :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise AdapterRejected(
                f"Adapter '{adapter}': adapter_config.json is nested more than {MAX_DEPTH} levels deep."
            )
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int_list(value: Any, *, minimum: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_LIST_LENGTH
        and all(_is_int(item) and item >= minimum for item in value)
    )


def _check_rank(rank: Any, adapter: str, field: str, max_rank: int | None) -> None:
    if not _is_int(rank) or rank <= 0:
        raise AdapterRejected(f"Adapter '{adapter}' has an invalid LoRA rank {field}={_show(rank)}.")
    if max_rank is not None and rank > max_rank:
        raise AdapterRejected(
            f"Adapter '{adapter}' has LoRA rank {rank} ({field}), above this gateway's maximum of "
            f"{max_rank} ([adapters] max_rank)."
        )


def _check_alpha(alpha: Any, adapter: str, field: str) -> None:
    if not _is_number(alpha) or not 0 < alpha <= 1e6:
        raise _reject(adapter, field, f"must be a number in (0, 1e6], not {_show(alpha)}")


def _check_regex(pattern: str, adapter: str, field: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _reject(adapter, field, f"holds a pattern longer than {MAX_PATTERN_LENGTH} characters")
    if _has_nested_repetition(pattern):
        raise _reject(adapter, field, f"holds the pattern {_show(pattern)} with nested repetition")
    try:
        # The forms peft and the gateway build around a pattern must compile too.
        re.compile(pattern)
        re.compile(rf"(.*\.)?({pattern})$")
        re.compile(rf"(.*\.)?{pattern}")
    except (re.error, RecursionError, OverflowError) as exc:
        raise _reject(
            adapter, field, f"holds {_show(pattern)}, which is not a valid regular expression"
        ) from exc


def _has_nested_repetition(pattern: str) -> bool:
    r"""True when a group holding a repetition or an alternation is itself repeated (``*``, ``+``, ``{``).

    ``(a+)+``, ``(.*)*`` or ``(\w|\w)*x`` backtrack exponentially, and Python's ``re`` has no time limit:
    one such pattern matched against module names would hold a worker thread for ever. Patterns that
    select modules never need them.
    """
    stack: list[bool] = []  # per open group: does it hold a repetition or an alternation?
    closed_risky = False  # the token just before the current position is a risky group
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            closed_risky = False
            continue
        if char == "[":  # a character class: skip to its end
            end = index + 1
            if end < len(pattern) and pattern[end] == "^":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            index = end + 1
            closed_risky = False
            continue
        if char in "*+{" and closed_risky:
            return True
        if char in "*+?{|" and stack:
            stack[-1] = True
        if char == "(":
            stack.append(False)
            closed_risky = False
            if pattern.startswith("?", index + 1):  # (?:...), (?P<name>...), (?=...): not a quantifier
                index += 1
        elif char == ")":
            risky = stack.pop() if stack else False
            if risky and stack:
                stack[-1] = True
            closed_risky = risky
        else:
            closed_risky = False
        index += 1
    return False


def _check_string_list(value: Any, adapter: str, field: str) -> list[str]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST_LENGTH
        or not all(isinstance(item, str) and 0 < len(item) <= MAX_STRING_LENGTH for item in value)
    ):
        raise _reject(adapter, field, f"must be a list of module names, not {_show(value)}")
    return value


def _check_modules(value: Any, adapter: str, field: str) -> list[str] | str:
    """``target_modules`` / ``exclude_modules``: null, a regex, or a list of module names."""
    if isinstance(value, str):
        if not value:
            return []
        _check_regex(value, adapter, field)
        return value
    return _check_string_list(value, adapter, field)


def _check_patterns(value: Any, adapter: str, field: str, max_rank: int | None) -> None:
    """``rank_pattern`` (regex -> rank) and ``alpha_pattern`` (regex -> alpha)."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_LIST_LENGTH:
        raise _reject(adapter, field, f"must be a JSON object of pattern -> number, not {_show(value)}")
    for key, number in value.items():
        _check_regex(key, adapter, field)
        if field == "rank_pattern":
            _check_rank(number, adapter, f"{field}[{key!r}]", max_rank)
        else:
            _check_alpha(number, adapter, f"{field}[{key!r}]")


def _check_layers(value: Any, adapter: str) -> None:
    if value is None or (_is_int(value) and value >= 0) or _is_int_list(value, minimum=0):
        return
    raise _reject(
        adapter, "layers_to_transform", f"must be a layer index or a list of them, not {_show(value)}"
    )


def _check_trainable_tokens(value: Any, adapter: str) -> None:
    if value is None or _is_int_list(value, minimum=0):
        return
    if isinstance(value, dict) and all(
        isinstance(key, str) and _is_int_list(item, minimum=0) for key, item in value.items()
    ):
        return
    raise _reject(
        adapter,
        "trainable_token_indices",
        f"must be a list of token ids or a mapping of them, not {_show(value)}",
    )
