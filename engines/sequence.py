"""One request's generation state: its KV cache, sampler, decoder, stop filter, and how it finishes.

The scheduler drives sequences step by step; a sequence only knows how to take the logits of its last
position, pick a token, turn it into text and decide whether it is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from engines.detokenize import IncrementalDecoder, StopStringFilter
from engines.generation import GenerationEvent, GenerationRequest, PromptLogprobs, TokenLogprob
from engines.loader import LoadedModel
from engines.prompts import token_bytes
from engines.sampling import Sampler, TokenChoice

Emit = Callable[[GenerationEvent], None]


class Sequence:
    """A request being generated. Not thread-safe except for ``cancel``."""

    def __init__(self, request: GenerationRequest, model: LoadedModel, emit: Emit) -> None:
        self.request = request
        self.model = model
        self.emit = emit
        self.cache: Any = None
        self.prefilled = 0
        self.logits: Any = None
        self.generated: list[int] = []
        self.finished = False
        #: The prompt's scored tokens so far (``request.prompt_logprobs``), filled chunk by chunk.
        self.prompt_scores: list[TokenLogprob] = []
        self._cancelled = threading.Event()
        self._sampler = Sampler(request.sampling, device=model.device)
        self._decoder = IncrementalDecoder(model.tokenizer)
        self._stops = StopStringFilter(request.stop)
        #: The row's own grammar state (structured outputs, forced tool calls), or None for a free row.
        self._grammar = request.grammar.matcher() if request.grammar is not None else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + len(self.generated)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (called from any thread)."""
        self._cancelled.set()

    def next_input(self) -> int:
        """The token this row feeds the next decode step: its last generated one.

        A row that joined its batch with only its prompt's last token left to compute (the rest came
        from the prefix cache) feeds that token, and the step's logits pick its first generated token.
        """
        return self.generated[-1] if self.generated else self.request.prompt_ids[-1]

    def step(self) -> None:
        """Pick a token from ``self.logits``, emit its text, and mark the sequence finished if done."""
        grammar = self._grammar
        allowed = grammar.allowed(self.logits.shape[-1]) if grammar is not None else None
        choice = self._sampler.choose(self.logits, allowed)
        self.logits = None
        token_id = choice.token_id
        logprobs = self._logprobs(choice) if self.request.sampling.logprobs else ()
        # Under a grammar, EOS is only allowed once the output is complete: it always ends the row.
        if token_id in self.model.eos_token_ids and (grammar is not None or not self.request.ignore_eos):
            self.generated.append(token_id)
            self._finish("stop", logprobs=logprobs, count_token=True)
            return
        self.generated.append(token_id)
        if grammar is not None:
            grammar.consume(token_id)
        text = self._stops.feed(self._decoder.push(token_id))
        if self._stops.stopped:
            self._finish("stop", text=text, logprobs=logprobs, count_token=True, flush=False)
            return
        if grammar is not None and grammar.finished:  # the grammar allows nothing more: done
            self._finish("stop", text=text, logprobs=logprobs, count_token=True)
            return
        if len(self.generated) >= self.request.max_tokens:
            self._finish("length", text=text, logprobs=logprobs, count_token=True)
            return
        if text or logprobs:
            self.emit(
                GenerationEvent(
                    text=text,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=len(self.generated),
                    logprobs=logprobs,
                )
            )

    def add_prompt_scores(self, scores: list[tuple[float, list[tuple[int, float]]]], start: int) -> None:
        """Record the scores of prompt tokens ``start, start + 1, ...`` (each given those before it)."""
        tokenizer = self.model.tokenizer
        prompt = self.request.prompt_ids
        for offset, (logprob, best) in enumerate(scores):
            text, raw = token_bytes(tokenizer, prompt[start + offset])
            top = tuple((*token_bytes(tokenizer, tid), lp) for tid, lp in best)
            self.prompt_scores.append(TokenLogprob(token=text, bytes=raw, logprob=logprob, top=top))

    def emit_prompt_logprobs(self) -> None:
        """Send the prompt's scores as one event, before any generated token."""
        first, _raw = token_bytes(self.model.tokenizer, self.request.prompt_ids[0])
        self.emit(
            GenerationEvent(
                text="",
                prompt_tokens=self.prompt_tokens,
                completion_tokens=0,
                prompt_logprobs=PromptLogprobs(first_token=first, scored=tuple(self.prompt_scores)),
            )
        )

    def finish_without_generating(self) -> None:
        """``max_tokens: 0``: the prompt was all that was asked for (scored, or just counted)."""
        self.logits = None
        self._finish("length", flush=False)

    def _finish(
        self,
        reason: str,
        *,
        text: str = "",
        logprobs: tuple[TokenLogprob, ...] = (),
        count_token: bool = True,
        flush: bool = True,
    ) -> None:
        if flush:
            tail = self._stops.feed(self._decoder.flush())
            if self._stops.stopped:
                reason = "stop"
            else:
                tail += self._stops.flush()
            text += tail
        self.finished = True
        self.cache = None
        self.emit(
            GenerationEvent(
                text=text,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=len(self.generated) if count_token else len(self.generated) - 1,
                logprobs=logprobs,
                finish_reason=reason,
            )
        )

    def fail(self, error: Exception) -> None:
        """End the sequence with an error event (the gateway turns it into an OpenAI error)."""
        from engines.errors import EngineError

        self.finished = True
        self.cache = None
        engine_error = error if isinstance(error, EngineError) else EngineError(f"Generation failed: {error}")
        self.emit(
            GenerationEvent(
                text="",
                prompt_tokens=self.prompt_tokens,
                completion_tokens=len(self.generated),
                error=engine_error,
            )
        )

    def _logprobs(self, choice: TokenChoice) -> tuple[TokenLogprob, ...]:
        tokenizer = self.model.tokenizer
        text, raw = token_bytes(tokenizer, choice.token_id)
        top = tuple((*token_bytes(tokenizer, tid), lp) for tid, lp in choice.top)
        return (TokenLogprob(token=text, bytes=raw, logprob=choice.logprob, top=top),)
