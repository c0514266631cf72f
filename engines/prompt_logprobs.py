"""Scoring a prompt's own tokens during prefill, for ``echo`` + ``logprobs`` (lm-eval's loglikelihood).

Prefill normally keeps the last position's logits only. A scored prompt keeps every position's, so the
prefill chunk is sized to hold ``chunk x vocab`` logits within ``PROMPT_LOGITS_BYTES``, and of each row
only the next prompt token's logprob and the top-k survive the chunk.
"""

from __future__ import annotations

from typing import Any

#: Bound on one chunk's float32 logits while scoring a prompt (the model's own logits tensor and the
#: log-softmax of it each take about this much).
PROMPT_LOGITS_BYTES = 64 * 2**20


def scored_chunk_tokens(vocab_size: int, budget: int) -> int:
    """How many prompt tokens one scored prefill chunk may take."""
    return max(1, min(budget, PROMPT_LOGITS_BYTES // (4 * max(vocab_size, 1))))


def score_rows(logits: Any, targets: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each of the first ``len(targets)`` rows of ``logits [positions, vocab]``: the target's
    logprob and the ``top`` best ``(token_id, logprob)``, from one float32 log-softmax.

    The target's logprob and the top entries come from the same tensor, so a greedy token's logprob
    equals the best top entry exactly (lm-eval's ``is_greedy`` compares them with ``==``).
    """
    import torch

    if not targets:
        return []
    rows = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=rows.device)
    chosen = rows.gather(1, index[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = rows.topk(min(top, rows.shape[-1]), dim=-1)
        best = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        best = [[] for _ in targets]
    return list(zip(chosen, best, strict=True))
