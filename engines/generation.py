"""What the gateway asks the engine to generate, and what comes back, as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engines.errors import EngineError
from engines.grammar import CompiledGrammar
from engines.sampling import SamplingParams


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation; ``content`` is already flattened to text."""

    role: str
    content: str
    name: str | None = None
    #: For templates with tool support: an assistant turn's calls, and the id a tool result answers.
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt, already tokenized, and how to continue it."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    request_id: str = ""
    #: Constrained decoding (``Engine.compile_grammar``): every token of the output must fit it.
    grammar: CompiledGrammar | None = None
    #: Score the prompt's own tokens too, with this many top alternatives each (``echo`` + ``logprobs``).
    #: ``None`` skips it: scoring needs every position's logits, not just the last one's.
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """OpenAI's per-token logprob entry: the token's text, its bytes, and the top alternatives."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own tokens as the model scores them (raw log-softmax, no sampling transforms).

    The first token has nothing before it to be predicted from, so it has text but no logprob;
    ``scored[i]`` is prompt token ``i + 1`` given the tokens before it.
    """

    first_token: str
    scored: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class GenerationEvent:
    """A step of output: new text (maybe empty while bytes complete), and at the end a finish reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    error: EngineError | None = None
    #: Set once, on the event sent when the prompt is done, for requests with ``prompt_logprobs``.
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None
