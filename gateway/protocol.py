"""Request schemas of the OpenAI API, as far as this gateway implements it.

Unknown fields are refused (OpenAI itself answers "Unrecognized request argument supplied"), and every
known field is either honoured or refused with a precise 400, so that a client never believes a
parameter took effect when it did not.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class _Request(BaseModel):
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


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessageIn:
        if self.content is None and self.role != "assistant":
            raise FieldError("content", f"a {self.role} message needs 'content'")
        return self


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


StopField = Annotated[str | list[str] | None, Field(default=None)]


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
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
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
