"""Choosing the next token from logits, per request: temperature, top-k, top-p, penalties, bias, seed.

Each request owns a ``torch.Generator`` seeded from its ``seed`` so that the same seed gives the same
output regardless of what else runs in the same process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engines.errors import InvalidGenerationRequest

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` or ``top_p == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        """Temperature 0, or ``top_p`` 0: a nucleus of no mass keeps only the most likely token.

        OpenAI accepts ``top_p: 0`` and answers with the most likely token. Taking it by the same argmax
        as temperature 0 gives exactly the greedy answer, ties included, and draws no random number; a
        nucleus of size 0 leaves nothing to sample from, and floating-point sums could make it so.
        """
        return self.temperature <= 1e-5 or self.top_p <= 0.0


@dataclass(frozen=True)
class TokenChoice:
    """A sampled token with its log-probability under the model, and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Stateful per-request sampler (it remembers which tokens were generated, for penalties)."""

    def __init__(self, params: SamplingParams, device: Any = "cpu") -> None:
        import torch

        self.params = params
        self._generator: Any = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            if params.seed is not None:
                self._generator.manual_seed(params.seed)
            else:
                self._generator.seed()
        self._counts: dict[int, int] = {}
        self._bias: tuple[Any, Any] | None = None

    def _adjust(self, logits: Any) -> Any:
        import torch

        p = self.params
        if p.logit_bias:
            if self._bias is None:
                vocab = logits.shape[-1]
                outside = sorted(t for t in p.logit_bias if not 0 <= t < vocab)
                if outside:
                    # A negative id would silently bias a token counted from the end of the vocabulary.
                    raise InvalidGenerationRequest(
                        f"logit_bias names token ids {outside[:5]} outside this model's vocabulary "
                        f"[0, {vocab}).",
                        param="logit_bias",
                    )
                ids = torch.tensor(list(p.logit_bias.keys()), device=logits.device)
                values = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                self._bias = (ids, values)
            ids, values = self._bias
            logits = logits.clone()
            logits[ids] += values
        if self._counts and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0):
            logits = logits.clone() if not p.logit_bias else logits
            ids = torch.tensor(list(self._counts.keys()), device=logits.device)
            counts = torch.tensor(list(self._counts.values()), dtype=logits.dtype, device=logits.device)
            if p.repetition_penalty != 1.0:
                chosen = logits[ids]
                logits[ids] = torch.where(
                    chosen > 0, chosen / p.repetition_penalty, chosen * p.repetition_penalty
                )
            logits[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return logits

    def choose(self, logits: Any, allowed: Any = None) -> TokenChoice:
        """Pick the next token from a 1-D float tensor of vocabulary logits.

        ``allowed`` (a bool tensor over the vocabulary, from a grammar) restricts the choice; logprobs
        stay those of the unconstrained model, as OpenAI reports them for structured outputs.
        """
        import torch

        p = self.params
        raw = logits.float()
        adjusted = self._adjust(raw)
        if allowed is not None:
            adjusted = adjusted.masked_fill(~allowed, float("-inf"))
        if p.greedy:
            token_id = int(torch.argmax(adjusted))
        else:
            scores = adjusted / p.temperature
            if p.top_k > 0 and p.top_k < scores.shape[-1]:
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if p.top_p < 1.0:
                # Stable, so that among tied tokens the nucleus keeps the lowest ids first, as argmax does.
                sorted_probs, order = torch.sort(probs, descending=True, stable=True)
                cumulative = torch.cumsum(sorted_probs, dim=-1)
                drop = cumulative - sorted_probs > p.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            token_id = int(torch.multinomial(probs, 1, generator=self._generator))
        self._counts[token_id] = self._counts.get(token_id, 0) + 1
        if not p.logprobs:
            return TokenChoice(token_id=token_id, logprob=0.0)
        logprobs = torch.log_softmax(raw, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if p.top_logprobs:
            values, ids = torch.topk(logprobs, min(p.top_logprobs, MAX_TOP_LOGPROBS))
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenChoice(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
