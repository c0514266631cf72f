"""Streaming text: whole characters only (IncrementalDecoder) and stop strings cut out (StopStringFilter)."""

from __future__ import annotations

from typing import Any

import pytest

from engines.detokenize import REPLACEMENT, IncrementalDecoder, StopStringFilter
from engines.prompts import skipped_token_texts
from engines.testing.tiny import build_byte_tokenizer

CHINESE = "世界上最大的动物是蓝鲸。"
ENGLISH = "The largest animal in the world is the blue whale."
MIXED = "Whale 鲸 größte 🐋 end"


@pytest.fixture(scope="module")
def byte_tokenizer() -> Any:
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """Learned merges, so that single tokens hold whole characters, several, or pieces of one."""
    corpus = [CHINESE * 3, ENGLISH * 3, MIXED * 3, "蓝色的鲸鱼 blue whales"]
    return build_byte_tokenizer(corpus, merges=60)


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def stream(tokenizer: Any, ids: list[int]) -> tuple[list[str], str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(token) for token in ids], decoder.flush()


# --- IncrementalDecoder -----------------------------------------------------------------------------------


def test_chinese_is_split_across_byte_tokens(byte_tokenizer: Any) -> None:
    # The premise of the tests below: three byte tokens per character, no merges.
    assert len(ids_of(byte_tokenizer, CHINESE)) == 3 * len(CHINESE)


def test_chinese_token_by_token_never_yields_a_replacement_character(byte_tokenizer: Any) -> None:
    deltas, tail = stream(byte_tokenizer, ids_of(byte_tokenizer, CHINESE))
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert tail == ""


def test_chinese_deltas_concatenate_to_the_original(byte_tokenizer: Any) -> None:
    deltas, tail = stream(byte_tokenizer, ids_of(byte_tokenizer, CHINESE))
    assert "".join(deltas) + tail == CHINESE


def test_each_chinese_character_comes_out_whole_on_its_last_byte(byte_tokenizer: Any) -> None:
    deltas, _ = stream(byte_tokenizer, ids_of(byte_tokenizer, CHINESE))
    assert [delta for delta in deltas if delta] == list(CHINESE)
    assert deltas[0::3] == [""] * len(CHINESE)
    assert deltas[1::3] == [""] * len(CHINESE)


def test_english_comes_out_one_character_per_token(byte_tokenizer: Any) -> None:
    deltas, tail = stream(byte_tokenizer, ids_of(byte_tokenizer, ENGLISH))
    assert deltas == list(ENGLISH)
    assert tail == ""


def test_mixed_scripts_and_four_byte_emoji_round_trip(byte_tokenizer: Any) -> None:
    deltas, tail = stream(byte_tokenizer, ids_of(byte_tokenizer, MIXED))
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) + tail == MIXED


@pytest.mark.parametrize("text", [CHINESE, ENGLISH, MIXED])
def test_tokenizer_with_merges_round_trips_without_replacement(bpe_tokenizer: Any, text: str) -> None:
    deltas, tail = stream(bpe_tokenizer, ids_of(bpe_tokenizer, text))
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) + tail == text


def test_special_tokens_produce_no_text(byte_tokenizer: Any) -> None:
    im_end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*ids_of(byte_tokenizer, "蓝"), im_end, *ids_of(byte_tokenizer, "鲸")]
    deltas, tail = stream(byte_tokenizer, ids)
    assert "".join(deltas) + tail == "蓝鲸"


def test_special_token_between_bytes_of_a_character_does_not_break_it(byte_tokenizer: Any) -> None:
    im_end = byte_tokenizer.convert_tokens_to_ids("<|im_end|>")
    first, second, third = ids_of(byte_tokenizer, "鲸")
    deltas, tail = stream(byte_tokenizer, [first, im_end, second, third])
    assert deltas == ["", "", "", "鲸"]
    assert tail == ""


def test_flush_after_complete_text_returns_nothing(byte_tokenizer: Any) -> None:
    decoder = IncrementalDecoder(byte_tokenizer)
    for token in ids_of(byte_tokenizer, "ab鲸"):
        decoder.push(token)
    assert decoder.flush() == ""


def test_flush_drops_an_incomplete_last_character(byte_tokenizer: Any) -> None:
    # max_tokens can cut a character between its bytes: the reply ends at the last whole one ("蓝", not "蓝�").
    decoder = IncrementalDecoder(byte_tokenizer)
    first, second, _ = ids_of(byte_tokenizer, "鲸")
    assert decoder.push(ids_of(byte_tokenizer, "a")[0]) == "a"
    assert decoder.push(first) == ""
    assert decoder.push(second) == ""
    assert decoder.flush() == ""


@pytest.mark.parametrize("tokenizer_name", ["byte_tokenizer", "bpe_tokenizer"])
def test_text_cut_at_any_token_is_its_longest_whole_character_prefix(
    tokenizer_name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    ids = ids_of(tokenizer, CHINESE + MIXED)
    for cut in range(1, len(ids) + 1):
        deltas, tail = stream(tokenizer, ids[:cut])
        whole = "".join(deltas) + tail
        assert REPLACEMENT not in whole, (cut, whole)
        assert (CHINESE + MIXED).startswith(whole), (cut, whole)
        assert len(whole.encode("utf-8")) > len(_bytes_of(tokenizer, ids[:cut])) - 4, (cut, whole)


def _bytes_of(tokenizer: Any, ids: list[int]) -> bytes:
    from engines.prompts import token_bytes

    return b"".join(bytes(token_bytes(tokenizer, token)[1]) for token in ids)


def test_flush_twice_returns_nothing_the_second_time(byte_tokenizer: Any) -> None:
    decoder = IncrementalDecoder(byte_tokenizer)
    first = ids_of(byte_tokenizer, "鲸")[0]
    decoder.push(first)
    assert decoder.flush() == ""
    # The dropped byte is gone for good: what follows is decoded on its own.
    assert decoder.push(ids_of(byte_tokenizer, "a")[0]) == "a"
    assert decoder.flush() == ""


def test_flush_on_an_empty_decoder_returns_nothing(byte_tokenizer: Any) -> None:
    assert IncrementalDecoder(byte_tokenizer).flush() == ""


def test_pushing_after_flush_continues_with_new_text(byte_tokenizer: Any) -> None:
    decoder = IncrementalDecoder(byte_tokenizer)
    for token in ids_of(byte_tokenizer, "蓝"):
        decoder.push(token)
    decoder.flush()
    deltas = [decoder.push(token) for token in ids_of(byte_tokenizer, "鲸!")]
    assert "".join(deltas) == "鲸!"


# --- StopStringFilter -------------------------------------------------------------------------------------


def run_filter(stops: tuple[str, ...], deltas: list[str]) -> tuple[list[str], str, bool]:
    """Feed deltas until stopped; return what each feed released, the flush, and whether it stopped."""
    stop_filter = StopStringFilter(stops)
    released: list[str] = []
    for delta in deltas:
        released.append(stop_filter.feed(delta))
        if stop_filter.stopped:
            break
    return released, stop_filter.flush(), stop_filter.stopped


def test_without_stops_text_passes_straight_through() -> None:
    released, tail, stopped = run_filter((), ["Hel", "lo"])
    assert released == ["Hel", "lo"]
    assert (tail, stopped) == ("", False)


def test_empty_stop_strings_are_ignored() -> None:
    released, tail, stopped = run_filter(("",), ["abc"])
    assert (released, tail, stopped) == (["abc"], "", False)


def test_stop_inside_one_delta_cuts_before_it() -> None:
    released, tail, stopped = run_filter(("END",), ["one END two"])
    assert released == ["one "]
    assert (tail, stopped) == ("", True)


def test_stop_at_the_very_start_releases_nothing() -> None:
    released, _, stopped = run_filter(("END",), ["ENDING"])
    assert released == [""]
    assert stopped


def test_stop_spanning_deltas_is_cut_and_never_released() -> None:
    released, tail, stopped = run_filter(("\nUser:",), ["Sure.", "\n", "Us", "er", ": hi"])
    assert stopped
    assert "".join(released) + tail == "Sure."


def test_partial_prefix_is_held_back_until_it_cannot_be_a_stop() -> None:
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.feed("go ST") == "go "
    assert stop_filter.feed("O") == ""
    assert stop_filter.feed("NE") == "STONE"
    assert not stop_filter.stopped


def test_held_prefix_is_released_on_flush() -> None:
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.feed("the end ST") == "the end "
    assert stop_filter.flush() == "ST"
    assert stop_filter.flush() == ""
    assert not stop_filter.stopped


def test_repeated_stop_characters_hold_only_the_longest_possible_prefix() -> None:
    stop_filter = StopStringFilter(("aab",))
    assert stop_filter.feed("aaaa") == "aa"
    assert stop_filter.feed("b") == ""
    assert stop_filter.stopped


def test_earliest_of_several_stops_wins() -> None:
    released, _, stopped = run_filter(("two", "one"), ["zero one two"])
    assert released == ["zero "]
    assert stopped


def test_any_of_several_stops_can_end_the_stream() -> None:
    for stops in [("###", "\n\n"), ("\n\n", "###")]:
        released, tail, stopped = run_filter(stops, ["a", "#", "b", "\n", "\n", "c"])
        assert stopped
        assert "".join(released) + tail == "a#b"


def test_hold_back_covers_the_longest_prefix_among_several_stops() -> None:
    stop_filter = StopStringFilter(("xy", "abcd"))
    assert stop_filter.feed("..abc") == ".."
    assert stop_filter.feed("x") == "abc"
    assert stop_filter.feed("z") == "xz"


def test_stop_spanning_many_single_character_deltas() -> None:
    text = "Answer: 42<|end|>trailing"
    released, tail, stopped = run_filter(("<|end|>",), list(text))
    assert stopped
    assert "".join(released) + tail == "Answer: 42"


def test_chinese_stop_string_spanning_deltas() -> None:
    released, tail, stopped = run_filter(("蓝鲸",), ["世界上最大的动物是蓝", "鲸。"])
    assert stopped
    assert "".join(released) + tail == "世界上最大的动物是"


@pytest.mark.parametrize(
    "deltas",
    [
        ["ab", "cS", "TO", "Pde"],
        ["S", "T", "O", "P"],
        ["xSTO", "STOP"],
        ["STSTOP"],
        ["aSTOPbSTOP"],
    ],
)
def test_output_never_contains_the_stop_string(deltas: list[str]) -> None:
    released, tail, stopped = run_filter(("STOP",), deltas)
    output = "".join(released) + tail
    assert "STOP" not in output
    assert stopped
    assert output == "".join(deltas).split("STOP")[0]


def test_every_split_of_a_text_gives_the_same_output() -> None:
    text = "keep this ## and stop here ### not this"
    expected = "keep this ## and stop here "
    for cut in range(1, len(text)):
        for second_cut in range(cut, len(text), 7):
            deltas = [text[:cut], text[cut:second_cut], text[second_cut:]]
            released, tail, stopped = run_filter(("###",), deltas)
            assert stopped, deltas
            assert "".join(released) + tail == expected, deltas


def test_text_without_any_stop_comes_out_whole_after_flush() -> None:
    text = "S T O P is spelled out, ST and STO are not STOP-free? no: STOne"
    stops = ("STOP!",)
    released, tail, stopped = run_filter(stops, [text[i : i + 3] for i in range(0, len(text), 3)])
    assert not stopped
    assert "".join(released) + tail == text


def test_skipped_token_texts_are_the_tokens_decoding_leaves_out(byte_tokenizer: Any) -> None:
    skipped = skipped_token_texts(byte_tokenizer)
    ids = byte_tokenizer("a<|im_start|>b<|im_end|>c<s>", add_special_tokens=False)["input_ids"]
    pieces = [byte_tokenizer.decode([token]) for token in ids]
    kept = "".join(piece for piece in pieces if piece not in skipped)
    assert kept == byte_tokenizer.decode(ids, skip_special_tokens=True) == "abc"
    assert {"<|im_start|>", "<|im_end|>", "<s>"} <= skipped and "a" not in skipped
