"""The legacy completions logprobs: ``text_offset`` follows the returned text's characters, and a token
holding part of a character is shown by its bytes."""

from __future__ import annotations

from engines.generation import TokenLogprob
from gateway.completions import CompletionOffsets, prompt_offsets, shown_token

EOS = "<|im_end|>"


def entry(raw: bytes, text: str | None = None) -> TokenLogprob:
    return TokenLogprob(
        token=raw.decode("utf-8", "replace") if text is None else text, bytes=tuple(raw), logprob=0.0
    )


def place_all(pieces: list[TokenLogprob], start: int = 0) -> list[int]:
    offsets = CompletionOffsets(start, frozenset({EOS}))
    return [offsets.place(piece) for piece in pieces]


def test_bytes_of_one_character_share_its_offset_and_the_next_one_follows() -> None:
    pieces = [entry(b"a"), entry(b"\xe5"), entry(b"\xb7"), entry(b"\xb4"), entry(b"b")]  # a 巴 b
    assert place_all(pieces, start=5) == [5, 6, 6, 6, 7]


def test_a_special_token_left_out_of_the_text_takes_no_width() -> None:
    assert place_all([entry(b"a"), entry(EOS.encode()), entry(b"b")]) == [0, 1, 1]


def test_a_token_after_an_unfinished_character_starts_after_its_replacement() -> None:
    # b"\xe5" then b"b" decodes as "\ufffdb": the b token is the second character.
    assert place_all([entry(b"\xe5"), entry(b"b"), entry(b"c")]) == [0, 1, 2]


def test_prompt_tokens_are_found_in_the_echo() -> None:
    assert prompt_offsets([b"h", b"\xc3", b"\xa9", b"l"], "hél") == [0, 1, 1, 2]


def test_a_prompt_token_not_in_the_echo_takes_no_width() -> None:
    assert prompt_offsets([b"<s>", b"hi", b" there"], "hi there") == [0, 0, 2]


def test_a_special_token_written_in_the_prompt_is_counted() -> None:
    assert prompt_offsets([b"x", EOS.encode(), b"y"], f"x{EOS}y") == [0, 1, 11]


def test_a_sentencepiece_token_owns_the_space_before_it() -> None:
    # decode() of "▁world" alone drops the space the "▁" stands for.
    assert prompt_offsets([b"hello", b"world"], "hello world") == [0, 5]
    assert prompt_offsets([b"hello", b"world", b"!"], "hello world!") == [0, 5, 11]


def test_partial_characters_are_shown_by_their_escaped_bytes() -> None:
    assert shown_token("\ufffd", (0xE5, 0xB7)) == "bytes:\\xe5\\xb7"
    assert shown_token("巴", tuple("巴".encode())) == "巴"
    assert shown_token(EOS, tuple(EOS.encode())) == EOS
