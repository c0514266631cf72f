"""Sampler: greedy, seeds, top-k/top-p, logit bias, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engines.errors import InvalidGenerationRequest
from engines.sampling import MAX_TOP_LOGPROBS, Sampler, SamplingParams

VOCAB = 50


def peaked_logits(seed: int = 0) -> torch.Tensor:
    """Distinct logits (no ties) with a clear but not overwhelming maximum."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator) * 2.0


def flat_logits() -> torch.Tensor:
    return torch.zeros(VOCAB)


def draw(params: SamplingParams, logits: torch.Tensor, steps: int = 40) -> list[int]:
    sampler = Sampler(params)
    return [sampler.choose(logits).token_id for _ in range(steps)]


# --- greedy, seeds, top-k, top-p ------------------------------------------------------------------------


def test_greedy_picks_the_argmax() -> None:
    logits = peaked_logits()
    choice = Sampler(SamplingParams(temperature=0.0)).choose(logits)
    assert choice.token_id == int(torch.argmax(logits))


def test_greedy_is_the_same_every_step_without_penalties() -> None:
    logits = peaked_logits(3)
    assert set(draw(SamplingParams(temperature=0.0), logits, steps=10)) == {int(torch.argmax(logits))}


def test_greedy_ignores_the_seed() -> None:
    logits = peaked_logits()
    assert draw(SamplingParams(temperature=0.0, seed=1), logits, 5) == draw(
        SamplingParams(temperature=0.0, seed=2), logits, 5
    )


def test_tiny_temperature_counts_as_greedy() -> None:
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_greedy_accepts_half_precision_logits() -> None:
    logits = peaked_logits().to(torch.bfloat16)
    assert Sampler(SamplingParams(temperature=0.0)).choose(logits).token_id == int(torch.argmax(logits))


def test_same_seed_gives_the_same_sequence() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draw(params, flat_logits()) == draw(params, flat_logits())


def test_same_seed_gives_the_same_sequence_with_top_k_and_top_p() -> None:
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert draw(params, peaked_logits()) == draw(params, peaked_logits())


def test_seeded_samplers_do_not_disturb_each_other() -> None:
    params = SamplingParams(temperature=1.0, seed=99)
    alone = draw(params, flat_logits())
    first, second = Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=5))
    interleaved = []
    for _ in range(40):
        interleaved.append(first.choose(flat_logits()).token_id)
        second.choose(flat_logits())
    assert interleaved == alone


def test_global_torch_seed_does_not_affect_a_seeded_sampler() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    torch.manual_seed(0)
    first = draw(params, flat_logits())
    torch.manual_seed(1)
    assert draw(params, flat_logits()) == first


def test_different_seeds_give_different_sequences() -> None:
    # 40 draws from 50 equally likely tokens: two seeds agreeing everywhere has probability 50**-40.
    sequences = {tuple(draw(SamplingParams(temperature=1.0, seed=seed), flat_logits())) for seed in range(5)}
    assert len(sequences) == 5


def test_unseeded_samplers_differ() -> None:
    params = SamplingParams(temperature=1.0)
    assert draw(params, flat_logits()) != draw(params, flat_logits())


def test_flat_distribution_is_sampled_broadly() -> None:
    tokens = draw(SamplingParams(temperature=1.0, seed=0), flat_logits(), steps=500)
    assert len(set(tokens)) > 40


def test_top_k_one_equals_greedy() -> None:
    logits = peaked_logits(5)
    for seed in range(5):
        params = SamplingParams(temperature=1.5, top_k=1, seed=seed)
        assert set(draw(params, logits, 20)) == {int(torch.argmax(logits))}


def test_top_k_only_samples_among_the_k_best() -> None:
    logits = peaked_logits(6)
    best = set(torch.topk(logits, 3).indices.tolist())
    tokens = draw(SamplingParams(temperature=5.0, top_k=3, seed=0), logits, 200)
    assert set(tokens) == best


def test_tiny_top_p_equals_greedy() -> None:
    logits = peaked_logits(7)
    for seed in range(5):
        params = SamplingParams(temperature=2.0, top_p=1e-6, seed=seed)
        assert set(draw(params, logits, 20)) == {int(torch.argmax(logits))}


def tied_logits() -> torch.Tensor:
    """Three tokens tied for the maximum, far apart: an unstable sort puts the last one first."""
    logits = torch.zeros(VOCAB)
    logits[[7, VOCAB // 3, VOCAB - 2]] = 5.0
    return logits


@pytest.mark.parametrize("seed", [0, 1, 2, None])
def test_top_p_zero_keeps_only_the_token_greedy_picks(seed: int | None) -> None:
    for logits in (peaked_logits(8), tied_logits(), flat_logits()):
        greedy = Sampler(SamplingParams(temperature=0.0)).choose(logits).token_id
        params = SamplingParams(temperature=1.0, top_p=0.0, seed=seed, logprobs=True)
        choices = [Sampler(params).choose(logits) for _ in range(5)]
        assert {choice.token_id for choice in choices} == {greedy}
        assert all(math.isfinite(choice.logprob) for choice in choices)


def test_top_p_zero_counts_as_greedy() -> None:
    assert SamplingParams(temperature=1.0, top_p=0.0).greedy
    assert not SamplingParams(temperature=1.0, top_p=1e-6).greedy


def test_tiny_top_p_keeps_the_lowest_id_among_tied_tokens() -> None:
    logits = tied_logits()
    params = SamplingParams(temperature=1.0, top_p=1e-6, seed=0)
    assert set(draw(params, logits, 10)) == {int(torch.argmax(logits))}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.full((VOCAB,), -1e4)
    logits[[3, 8, 11]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    tokens = draw(SamplingParams(temperature=1.0, top_p=0.7, seed=0), logits, 300)
    assert set(tokens) == {3, 8}


# --- logit bias ------------------------------------------------------------------------------------------


def test_logit_bias_plus_100_forces_a_token() -> None:
    logits = peaked_logits()
    worst = int(torch.argmin(logits))
    assert set(draw(SamplingParams(temperature=0.0, logit_bias={worst: 100.0}), logits, 5)) == {worst}
    assert set(draw(SamplingParams(temperature=1.0, seed=0, logit_bias={worst: 100.0}), logits)) == {worst}


def test_logit_bias_minus_100_bans_a_token() -> None:
    logits = peaked_logits()
    best = int(torch.argmax(logits))
    choice = Sampler(SamplingParams(temperature=0.0, logit_bias={best: -100.0})).choose(logits)
    assert choice.token_id != best
    banned_flat = draw(SamplingParams(temperature=1.0, seed=0, logit_bias={7: -100.0}), flat_logits(), 500)
    assert 7 not in banned_flat


def test_logit_bias_does_not_modify_the_callers_logits() -> None:
    logits = peaked_logits()
    before = logits.clone()
    Sampler(SamplingParams(temperature=0.0, logit_bias={0: 100.0}, presence_penalty=2.0)).choose(logits)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("token_id", [VOCAB, VOCAB + 1000, -1])
def test_logit_bias_for_a_token_outside_the_vocabulary_is_refused(token_id: int) -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, logit_bias={token_id: 100.0}))
    with pytest.raises(InvalidGenerationRequest) as info:
        sampler.choose(peaked_logits())
    assert info.value.param == "logit_bias"


# --- penalties -------------------------------------------------------------------------------------------


def test_frequency_penalty_lowers_a_repeated_token_more_each_time() -> None:
    logits = torch.zeros(VOCAB)
    logits[4], logits[9] = 10.0, 7.5
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=1.0))
    # 4 is picked while 10 - count > 7.5, i.e. three times; then 9 takes over.
    assert [sampler.choose(logits).token_id for _ in range(4)] == [4, 4, 4, 9]


def test_presence_penalty_lowers_a_used_token_once() -> None:
    logits = torch.zeros(VOCAB)
    logits[4], logits[9] = 10.0, 9.0
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=1.5))
    tokens = [sampler.choose(logits).token_id for _ in range(4)]
    # 4 (10) -> 9 (9 > 8.5) -> 4 (8.5 > 7.5) -> 4 again: presence does not grow with the count.
    assert tokens == [4, 9, 4, 4]


def test_penalties_leave_unseen_tokens_alone() -> None:
    logits = torch.zeros(VOCAB)
    logits[4] = 1.0
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0))
    assert sampler.choose(logits).token_id == 4
    assert sampler.choose(logits).token_id == 0  # 4 is now at -3; all others still at 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.full((VOCAB,), -5.0)
    logits[4], logits[9] = 4.0, 2.5
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert sampler.choose(logits).token_id == 4
    assert sampler.choose(logits).token_id == 9  # 4.0 / 2 = 2.0 < 2.5


def test_penalties_lower_the_sampling_probability_of_a_repeated_token() -> None:
    logits = flat_logits()
    logits[0] = 3.0
    plain = draw(SamplingParams(temperature=1.0, seed=3), logits, 300).count(0)
    penalised = draw(SamplingParams(temperature=1.0, seed=3, frequency_penalty=2.0), logits, 300).count(0)
    assert penalised < plain / 3


def test_negative_presence_penalty_encourages_repetition() -> None:
    logits = torch.zeros(VOCAB)
    logits[4], logits[9] = 10.0, 9.9
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=-1.0, logit_bias={9: 0.2}))
    assert [sampler.choose(logits).token_id for _ in range(3)] == [9, 9, 9]


# --- logprobs --------------------------------------------------------------------------------------------


def test_without_logprobs_no_top_is_returned() -> None:
    choice = Sampler(SamplingParams(temperature=0.0, top_logprobs=5)).choose(peaked_logits())
    assert choice.top == ()


def test_logprob_is_log_softmax_of_the_raw_logits() -> None:
    logits = peaked_logits(11)
    expected = torch.log_softmax(logits, dim=-1)
    params = SamplingParams(temperature=0.7, seed=0, logprobs=True)
    sampler = Sampler(params)
    for _ in range(10):
        choice = sampler.choose(logits)
        assert math.isclose(choice.logprob, float(expected[choice.token_id]), rel_tol=1e-6, abs_tol=1e-6)


def test_logprob_ignores_bias_penalties_and_temperature() -> None:
    logits = peaked_logits(12)
    expected = torch.log_softmax(logits, dim=-1)
    params = SamplingParams(
        temperature=0.0, logprobs=True, top_logprobs=3, logit_bias={5: 100.0}, frequency_penalty=1.0
    )
    choice = Sampler(params).choose(logits)
    assert choice.token_id == 5
    assert math.isclose(choice.logprob, float(expected[5]), abs_tol=1e-6)
    assert [token for token, _ in choice.top] == torch.topk(expected, 3).indices.tolist()


@pytest.mark.parametrize("count", [1, 5, MAX_TOP_LOGPROBS])
def test_top_logprobs_has_the_requested_length_sorted_best_first(count: int) -> None:
    logits = peaked_logits(13)
    expected = torch.log_softmax(logits, dim=-1)
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=count)).choose(logits)
    assert len(choice.top) == count
    values = [logprob for _, logprob in choice.top]
    assert values == sorted(values, reverse=True)
    for token, logprob in choice.top:
        assert isinstance(token, int)
        assert math.isclose(logprob, float(expected[token]), abs_tol=1e-6)
    assert choice.top[0][0] == choice.token_id


def test_top_logprobs_is_capped() -> None:
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 10)
    assert len(Sampler(params).choose(peaked_logits()).top) == MAX_TOP_LOGPROBS


def test_logprobs_without_top_logprobs_gives_an_empty_top() -> None:
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=True)).choose(peaked_logits())
    assert choice.top == ()
    assert choice.logprob < 0.0


def test_logprobs_of_half_precision_logits_are_computed_in_float32() -> None:
    logits = peaked_logits(14).to(torch.bfloat16)
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=True)).choose(logits)
    expected = torch.log_softmax(logits.float(), dim=-1)[choice.token_id]
    assert math.isclose(choice.logprob, float(expected), abs_tol=1e-6)
