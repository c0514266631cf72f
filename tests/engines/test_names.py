"""ModelName.parse: what a ``model`` string may be, and what is refused before any disk or Hub access."""

from __future__ import annotations

import pytest

from engines.errors import InvalidModelName
from engines.names import MAX_NAME_LENGTH, ModelName, is_alias, is_hub_id, looks_like_path


def test_bare_base_has_no_adapter_and_no_revision() -> None:
    name = ModelName.parse("tiny")
    assert name == ModelName(base="tiny", adapter=None, revision=None)


def test_base_may_itself_be_a_hub_id() -> None:
    assert (
        ModelName.parse("HuggingFaceTB/SmolLM2-135M-Instruct").base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_base_plus_hub_adapter() -> None:
    name = ModelName.parse("tiny+org/adapter")
    assert (name.base, name.adapter, name.revision) == ("tiny", "org/adapter", None)


def test_base_plus_hub_adapter_with_revision() -> None:
    name = ModelName.parse("tiny+org/adapter@v1.0")
    assert (name.base, name.adapter, name.revision) == ("tiny", "org/adapter", "v1.0")


@pytest.mark.parametrize("revision", ["main", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"])
def test_branch_pr_ref_and_commit_revisions_are_accepted(revision: str) -> None:
    assert ModelName.parse(f"tiny+org/adapter@{revision}").revision == revision


def test_base_plus_alias() -> None:
    name = ModelName.parse("tiny+my-lora_v2.1")
    assert (name.base, name.adapter, name.revision) == ("tiny", "my-lora_v2.1", None)


@pytest.mark.parametrize("path", ["./adapters/x", "/srv/adapters/x", "~/adapters/x", "team/project/x"])
def test_base_plus_path_is_kept_verbatim(path: str) -> None:
    assert ModelName.parse(f"tiny+{path}").adapter == path


@pytest.mark.parametrize(
    "text", ["tiny", "tiny+org/adapter", "tiny+org/adapter@main", "tiny+alias", "tiny+./a/b@v2"]
)
def test_str_round_trips(text: str) -> None:
    assert str(ModelName.parse(text)) == text
    assert ModelName.parse(str(ModelName.parse(text))) == ModelName.parse(text)


def test_surrounding_spaces_are_ignored() -> None:
    assert ModelName.parse("  tiny+org/adapter  ") == ModelName("tiny", "org/adapter")


def test_name_of_exactly_max_length_is_accepted() -> None:
    text = "b" * MAX_NAME_LENGTH
    assert ModelName.parse(text).base == text


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_name_is_refused(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(None)  # type: ignore[arg-type]


def test_overlong_name_is_refused() -> None:
    with pytest.raises(InvalidModelName, match="longer than"):
        ModelName.parse("tiny+org/" + "a" * MAX_NAME_LENGTH)


@pytest.mark.parametrize(
    "text",
    [
        "tiny+../etc",
        "tiny+./../../etc/passwd",
        "tiny+/srv/adapters/../../etc",
        "tiny+a/b/../../..",
        "tiny+..\\..\\windows",
        "tiny+..",
        "../tiny",
        "a/../b",
    ],
)
def test_dotdot_components_are_refused(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "tiny\x00",
        "tiny+org/ad\x00apter",
        "tiny+org/adapter\n",
        "tiny\r\n",
        "tiny+/srv/a\x1bb/c",
        "tiny+org/adapter@main\x7f",
        "tiny+/srv/x\x85y/z",
        "\x1ftiny",
    ],
)
def test_control_characters_are_refused_anywhere(text: str) -> None:
    with pytest.raises(InvalidModelName, match="control"):
        ModelName.parse(text)


@pytest.mark.parametrize("text", ["tiny+org/a+org/b", "tiny++org/a", "tiny+a+b@main"])
def test_more_than_one_plus_is_refused(text: str) -> None:
    with pytest.raises(InvalidModelName, match=r"more than one '\+'"):
        ModelName.parse(text)


@pytest.mark.parametrize("text", ["tiny+", "tiny+@main", "tiny+ "])
def test_plus_without_adapter_is_refused(text: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(text)


@pytest.mark.parametrize(
    "revision", ["", "-main", "../main", "main..x", "ma in", "v1;rm", "/main", "a" * 300]
)
def test_bad_revision_is_refused(revision: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(f"tiny+org/adapter@{revision}")


@pytest.mark.parametrize("base", ["", "-tiny", "/abs/base", ".hidden", "ti ny", "tiny@main", "ti..ny"])
def test_bad_base_is_refused(base: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(f"{base}+org/adapter")


@pytest.mark.parametrize(
    "adapter",
    [
        "org/-name",
        "org/na--me",
        "org/na..me",
        "org/",
        "my adapter",
        "a;b",
        "org/a@b@c",
        "-alias",
        ".",
        "org/" + "x" * 97,
    ],
)
def test_adapter_that_is_no_hub_id_alias_or_path_is_refused(adapter: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelName.parse(f"tiny+{adapter}")


def test_refusal_names_the_model_param() -> None:
    with pytest.raises(InvalidModelName) as info:
        ModelName.parse("tiny+../x")
    assert info.value.param == "model"
    assert info.value.code == "invalid_model_name"


def test_hub_id_shape() -> None:
    assert is_hub_id("org/name")
    assert is_hub_id("Org-1/name_2.v3")
    assert not is_hub_id("name")
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("org/na--me")
    assert not is_hub_id("org/na..me")
    assert not is_hub_id("org/name\n")


def test_alias_shape() -> None:
    assert is_alias("my-lora")
    assert not is_alias("org/name")
    assert not is_alias("a..b")
    assert not is_alias("-x")
    assert not is_alias("alias\n")


def test_path_shape() -> None:
    assert looks_like_path("/abs")
    assert looks_like_path("./rel")
    assert looks_like_path("~/home")
    assert looks_like_path("a/b/c")
    assert not looks_like_path("org/name")
    assert not looks_like_path("alias")
