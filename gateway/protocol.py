"""Request schemas of the OpenAI API, as far as this gateway implements it.

Unknown fields are refused (OpenAI itself answers "Unrecognized request argument supplied"), and every
known field is either honoured or refused with a precise 400, so that a client never believes a
parameter took effect when it did not.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4
_TOKEN_ID = re.compile(r"-?[0-9]{1,19}")


class FieldError(ValueError):
    """A validator's complaint about one field: ``gateway.errors.from_validation`` reports it as ``param``.

    A model validator sees the whole request, so pydantic locates its errors at the model itself and an
    OpenAI client would get ``param: null``; raising this names the field it is really about (relative to
    the model that raised it).
    """

    def __init__(self, param: str, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def system_fingerprint(model: str) -> str:
    """OpenAI's ``system_fingerprint``: a short, stable hash of the model name (base, adapter, revision).

    OpenAI's schema types it as a string; ``null`` failed schema checks. The same name gives the same
    fingerprint, so a client can tell answers of different models or adapters apart.
    """
    return "fp_" + hashlib.sha256(model.encode("utf-8")).hexdigest()[:10]


class StrictRequest(BaseModel):
    """A request body that refuses unknown fields by name and reads an explicit ``null`` as "not given"."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit ``null`` for an optional field means "not given", as in OpenAI's API.

        Clients that serialise every attribute (``"n": null``, ``"stream": null``) are accepted; a
        ``null`` for a required field still fails, naming that field.
        """
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str


#: Content part types OpenAI defines that these text-only models cannot take, and how to name them.
UNSUPPORTED_PARTS = {
    "image_url": "image inputs",
    "input_image": "image inputs",
    "input_audio": "audio inputs",
    "file": "file inputs",
    "input_file": "file inputs",
}


class UnsupportedPart(BaseModel):
    """An image, audio or file part: refused by what it is, rather than "Input should be a valid string"."""

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, data: Any) -> Any:
        kind = UNSUPPORTED_PARTS.get(str(data.get("type")) if isinstance(data, dict) else "", "these inputs")
        raise PydanticCustomError(
            "unsupported_content", "{kind} are not supported by this model", {"kind": kind}
        )


def part_tag(value: Any) -> str:
    """The branch for a content part, picked by its ``type`` without ever hashing a client value.

    A ``type`` that is not a string (an object, a list) goes to the text branch, whose ``Literal``
    refuses it as ``...content[i].type``, as it does an unknown string; looking such a value up in
    ``UNSUPPORTED_PARTS`` would raise ``TypeError`` (unhashable), a 500.
    """
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "part:unsupported" if isinstance(kind, str) and kind in UNSUPPORTED_PARTS else "part:text"


def content_tag(value: Any) -> str:
    return "list[parts]" if isinstance(value, list) else "str"


# The tags make pydantic validate only the branch the value's shape picks, so errors name the real
# problem (an extra key in a text part, an image part) instead of "Input should be a valid string" from
# the string branch; ``gateway.errors.param_from_loc`` leaves the tags out of ``param``.
ContentPart = Annotated[
    Annotated[TextPart, Tag("part:text")] | Annotated[UnsupportedPart, Tag("part:unsupported")],
    Discriminator(part_tag),
]
MessageContent = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[ContentPart], Tag("list[parts]")],
    Discriminator(content_tag),
]


class ChatMessageIn(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessageIn:
        if self.content is None and self.role != "assistant":
            raise FieldError("content", f"a {self.role} message needs 'content'")
        return self


class StreamOptions(StrictRequest):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ResponseFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


StopField = Annotated[str | list[str] | None, Field(default=None)]


class SamplingFields(StrictRequest):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    # 0 is allowed, as in OpenAI's API: only the most likely token (``SamplingParams.greedy``).
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extras that vLLM and llama.cpp accept too.
    top_k: int | None = Field(default=None, ge=-1)
    # Below 0.01 the division by the penalty overflows float32 logits to inf, and sampling breaks.
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
            if any(not item for item in value):
                raise ValueError("stop sequences must be non-empty strings")
        elif value == "":
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):  # str.isdigit() is true for "²", which int() refuses
                raise ValueError(f"logit_bias keys must be token ids, got '{key}'")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # Identifiers and hints that do not change what is generated (like ``user``): accepted.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    # OpenAI fields this gateway cannot honour. They are part of the schema so that a client hears
    # "not supported" (``chat.refuse_unsupported``) rather than "unrecognized argument".
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    @field_validator("store")
    @classmethod
    def _nothing_is_stored(cls, value: bool | None) -> bool | None:
        """``store: true`` asks OpenAI to keep the completion for evals and distillation; nothing here would."""
        if value:
            raise FieldError(
                "",
                "this gateway does not store completions; leave 'store' out or set it to false",
                code="unsupported_parameter",
            )
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with ``echo`` + ``logprobs`` scores the prompt without generating (lm-eval's loglikelihood).
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
