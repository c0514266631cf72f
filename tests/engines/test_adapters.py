"""Finding adapters (alias, folder under the roots, Hub id) and refusing bad ones before any weight is read."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.adapters.files import (
    AdapterFiles,
    AdapterRef,
    check_base_match,
    check_tensor_ranks,
    local_adapter_folder,
    read_adapter_files,
    resolve_adapter_ref,
)
from engines.adapters.variants import check_adapter_fits
from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.errors import AdapterRejected, InvalidModelName, ModelNotFound
from engines.loader import LoadedModel, load_base
from engines.testing.tiny import TinyShape, save_tiny_adapter, save_tiny_base
from tests.conftest import TinyModels

BASE = BaseSpec(name="tiny", source="test-org/tiny-base", aliases=("tiny-alias",), token="hf_base_token")


# --- helpers -------------------------------------------------------------------------------------------


def make_adapter_folder(folder: Path, config: dict[str, Any] | None = None) -> Path:
    """A folder that looks like an adapter to the resolver: an adapter_config.json and a weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or lora_config()), encoding="utf-8")
    (folder / "adapter_model.safetensors").write_bytes(b"not read by the resolver")
    return folder


def lora_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "test-org/tiny-base",
        "use_dora": False,
        "rank_pattern": {},
    }
    config.update(overrides)
    return config


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """Two adapter roots, and a folder outside both holding a perfectly valid adapter."""
    first, second = tmp_path / "root-a", tmp_path / "root-b"
    first.mkdir()
    second.mkdir()
    make_adapter_folder(tmp_path / "outside" / "evil")
    return first, second


def catalog_for(*dirs: Path, adapters: tuple[AdapterSpec, ...] = ()) -> Catalog:
    return Catalog(bases=(BASE,), adapters=adapters, policy=AdapterPolicy(adapter_dirs=dirs))


# --- resolve_adapter_ref / local_adapter_folder ----------------------------------------------------------


def test_alias_to_local_folder_resolves_to_that_folder(tmp_path: Path) -> None:
    folder = make_adapter_folder(tmp_path / "anywhere" / "zh")
    catalog = catalog_for(adapters=(AdapterSpec(alias="zh", source=str(folder), base="tiny"),))
    ref = resolve_adapter_ref(catalog, BASE, "zh", None)
    assert ref == AdapterRef(kind="local", source=str(folder.resolve()), alias="zh")


def test_alias_may_name_the_base_by_one_of_its_aliases(tmp_path: Path) -> None:
    folder = make_adapter_folder(tmp_path / "zh")
    catalog = catalog_for(adapters=(AdapterSpec(alias="zh", source=str(folder), base="tiny-alias"),))
    assert resolve_adapter_ref(catalog, BASE, "zh", None).kind == "local"


def test_alias_to_hub_id_resolves_to_hub_with_its_revision_and_token() -> None:
    spec = AdapterSpec(alias="zh", source="org/zh-lora", base="tiny", revision="v1", token="hf_adapter")
    ref = resolve_adapter_ref(catalog_for(adapters=(spec,)), BASE, "zh", None)
    assert ref == AdapterRef(kind="hub", source="org/zh-lora", revision="v1", token="hf_adapter", alias="zh")


def test_revision_in_the_name_overrides_the_aliases_revision() -> None:
    spec = AdapterSpec(alias="zh", source="org/zh-lora", base="tiny", revision="v1")
    ref = resolve_adapter_ref(catalog_for(adapters=(spec,)), BASE, "zh", "v2")
    assert ref.revision == "v2"
    assert ref.key == "org/zh-lora@v2"
    assert ref.token == "hf_base_token"


def test_alias_configured_for_another_base_is_refused(tmp_path: Path) -> None:
    folder = make_adapter_folder(tmp_path / "zh")
    catalog = catalog_for(adapters=(AdapterSpec(alias="zh", source=str(folder), base="other"),))
    with pytest.raises(AdapterRejected, match="other"):
        resolve_adapter_ref(catalog, BASE, "zh", None)


def test_alias_to_missing_folder_is_not_found(tmp_path: Path) -> None:
    spec = AdapterSpec(alias="zh", source=str(tmp_path / "gone" / "zh"), base="tiny")
    with pytest.raises(ModelNotFound, match="zh"):
        resolve_adapter_ref(catalog_for(adapters=(spec,)), BASE, "zh", None)


def test_folder_directly_under_a_root_is_found(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[0] / "tiny-lora")
    ref = resolve_adapter_ref(catalog_for(*roots), BASE, "tiny-lora", None)
    assert ref == AdapterRef(kind="local", source=str(folder.resolve()))


def test_nested_folder_under_the_second_root_is_found(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[1] / "team" / "project" / "lora")
    ref = resolve_adapter_ref(catalog_for(*roots), BASE, "team/project/lora", None)
    assert ref.kind == "local"
    assert Path(ref.source) == folder.resolve()


def test_dot_slash_path_is_relative_to_the_roots(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[0] / "x")
    assert local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "./x") == folder.resolve()


def test_absolute_path_inside_a_root_is_found(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[1] / "abs-lora")
    assert local_adapter_folder(AdapterPolicy(adapter_dirs=roots), str(folder)) == folder.resolve()


def test_local_folder_shaped_like_a_hub_id_wins_over_the_hub(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[0] / "org" / "name")
    ref = resolve_adapter_ref(catalog_for(*roots), BASE, "org/name", None)
    assert ref == AdapterRef(kind="local", source=str(folder.resolve()))


def test_folder_without_adapter_config_is_not_an_adapter(roots: tuple[Path, Path]) -> None:
    (roots[0] / "team" / "project" / "empty").mkdir(parents=True)
    with pytest.raises(ModelNotFound):
        resolve_adapter_ref(catalog_for(*roots), BASE, "team/project/empty", None)


@pytest.mark.parametrize("text", ["../outside/evil", "sub/../../outside/evil", "..\\outside\\evil"])
def test_dotdot_escape_to_an_existing_folder_is_refused(roots: tuple[Path, Path], text: str) -> None:
    (roots[0] / "sub").mkdir()
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), text)


def test_dotdot_escape_to_a_missing_folder_is_refused_too(roots: tuple[Path, Path]) -> None:
    # Same answer whether or not the target exists: the error must not reveal what is on disk.
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "../outside/no-such-thing")


def test_dotdot_that_stays_inside_the_root_is_still_refused(roots: tuple[Path, Path]) -> None:
    make_adapter_folder(roots[0] / "x")
    (roots[0] / "sub").mkdir()
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "sub/../x")


def test_absolute_path_outside_the_roots_is_refused(roots: tuple[Path, Path]) -> None:
    outside = roots[0].parent / "outside" / "evil"
    with pytest.raises(InvalidModelName, match="outside"):
        resolve_adapter_ref(catalog_for(*roots), BASE, str(outside), None)


def test_absolute_path_to_a_missing_folder_outside_the_roots_is_refused(roots: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "/no/such/folder/anywhere")


def test_absolute_path_with_no_roots_configured_is_refused(roots: tuple[Path, Path]) -> None:
    outside = roots[0].parent / "outside" / "evil"
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(), str(outside))


def test_home_relative_path_outside_the_roots_is_refused(roots: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "~/adapters/x")


def test_symlink_inside_a_root_pointing_outside_is_refused(roots: tuple[Path, Path]) -> None:
    outside = roots[0].parent / "outside" / "evil"
    os.symlink(outside, roots[0] / "link", target_is_directory=True)
    with pytest.raises(InvalidModelName, match="outside"):
        resolve_adapter_ref(catalog_for(*roots), BASE, "link", None)


def test_symlinked_parent_inside_a_root_pointing_outside_is_refused(roots: tuple[Path, Path]) -> None:
    os.symlink(roots[0].parent / "outside", roots[0] / "team", target_is_directory=True)
    with pytest.raises(InvalidModelName):
        resolve_adapter_ref(catalog_for(*roots), BASE, "team/evil", None)


def test_absolute_path_through_a_symlink_in_a_root_is_refused(roots: tuple[Path, Path]) -> None:
    os.symlink(roots[0].parent / "outside" / "evil", roots[0] / "link", target_is_directory=True)
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), str(roots[0] / "link"))


def test_symlink_between_two_roots_is_allowed(roots: tuple[Path, Path]) -> None:
    folder = make_adapter_folder(roots[1] / "real")
    os.symlink(folder, roots[0] / "link", target_is_directory=True)
    assert local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "link") == folder.resolve()


@pytest.mark.parametrize("text", ["./missing", "team/project/missing", "/missing-under-root"])
def test_missing_path_under_the_roots_is_not_found(roots: tuple[Path, Path], text: str) -> None:
    if text.startswith("/"):
        text = str(roots[0]) + text
    with pytest.raises(ModelNotFound):
        resolve_adapter_ref(catalog_for(*roots), BASE, text, None)


def test_unknown_alias_is_not_found_and_lists_the_aliases(roots: tuple[Path, Path]) -> None:
    spec = AdapterSpec(alias="zh", source="org/zh", base="tiny")
    with pytest.raises(ModelNotFound, match="zh"):
        resolve_adapter_ref(catalog_for(*roots, adapters=(spec,)), BASE, "no-such-alias", None)


def test_hub_id_shaped_name_resolves_to_the_hub(roots: tuple[Path, Path]) -> None:
    ref = resolve_adapter_ref(catalog_for(*roots), BASE, "org/some-lora", "main")
    assert ref == AdapterRef(kind="hub", source="org/some-lora", revision="main", token="hf_base_token")
    assert ref.key == "org/some-lora@main"


def test_hub_id_with_no_roots_configured_resolves_to_the_hub() -> None:
    assert resolve_adapter_ref(catalog_for(), BASE, "org/some-lora", None).kind == "hub"


def test_nul_in_a_path_is_refused(roots: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidModelName):
        local_adapter_folder(AdapterPolicy(adapter_dirs=roots), "a\x00b")


# --- read_adapter_files ----------------------------------------------------------------------------------


@pytest.fixture
def adapter_copy(tiny_models: TinyModels, tmp_path: Path) -> Callable[..., Path]:
    """A fresh copy of the real tiny adapter, with its config changed by keyword arguments."""

    def make(**overrides: Any) -> Path:
        folder = tmp_path / "adapter"
        shutil.copytree(tiny_models.adapter, folder)
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.update(overrides)
        config_path.write_text(json.dumps(config), encoding="utf-8")
        return folder

    return make


def read(folder: Path, policy: AdapterPolicy | None = None) -> AdapterFiles:
    ref = AdapterRef(kind="local", source=str(folder))
    return read_adapter_files(ref, folder, policy or AdapterPolicy())


def test_real_lora_adapter_is_read(adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy()
    files = read(folder)
    assert files.folder == folder
    assert files.rank == 4
    assert sorted(files.target_modules) == ["q_proj", "v_proj"]
    assert files.weights_file == folder / "adapter_model.safetensors"
    assert files.config["peft_type"] == "LORA"


def test_peft_type_is_case_insensitive(adapter_copy: Callable[..., Path]) -> None:
    assert read(adapter_copy(peft_type="lora")).rank == 4


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "IA3", "LOHA", "", None])
def test_non_lora_peft_type_is_refused(adapter_copy: Callable[..., Path], peft_type: str | None) -> None:
    with pytest.raises(AdapterRejected, match="only LoRA"):
        read(adapter_copy(peft_type=peft_type))


def test_dora_is_refused(adapter_copy: Callable[..., Path]) -> None:
    with pytest.raises(AdapterRejected, match="DoRA"):
        read(adapter_copy(use_dora=True))


def test_rank_above_the_maximum_is_refused(adapter_copy: Callable[..., Path]) -> None:
    with pytest.raises(AdapterRejected, match="max_rank"):
        read(adapter_copy(r=300))


def test_rank_at_the_maximum_is_accepted(adapter_copy: Callable[..., Path]) -> None:
    files = read(adapter_copy(r=4), AdapterPolicy(max_rank=4))
    check_tensor_ranks(files, AdapterPolicy(max_rank=4))
    assert files.rank == 4


def test_rank_pattern_above_the_maximum_is_refused(adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy(rank_pattern={"q_proj": 64})
    with pytest.raises(AdapterRejected, match="64"):
        read(folder, AdapterPolicy(max_rank=32))


@pytest.mark.parametrize("rank", [0, -1, "4", None, 2.5])
def test_invalid_rank_is_refused(adapter_copy: Callable[..., Path], rank: object) -> None:
    with pytest.raises(AdapterRejected, match="rank"):
        read(adapter_copy(r=rank))


def test_config_without_target_modules_is_refused(adapter_copy: Callable[..., Path]) -> None:
    with pytest.raises(AdapterRejected, match="target_modules"):
        read(adapter_copy(target_modules=None, target_parameters=None))


def test_pickle_only_weights_are_refused_when_the_config_disallows_them(
    adapter_copy: Callable[..., Path],
) -> None:
    folder = adapter_copy()
    pickle_from_safetensors(folder)
    with pytest.raises(AdapterRejected, match="allow_pickle = false"):
        read(folder, AdapterPolicy(allow_pickle=False))


def test_pickle_only_weights_are_served_from_a_safetensors_copy_by_default(
    adapter_copy: Callable[..., Path],
) -> None:
    from safetensors.torch import load_file

    folder = adapter_copy()
    tensors = pickle_from_safetensors(folder)
    weights = read(folder).weights_file
    assert weights.suffix == ".safetensors" and weights.parent != folder
    copy = load_file(str(weights))
    assert copy.keys() == tensors.keys() and all(torch.equal(copy[k], tensors[k]) for k in tensors)
    assert (weights.parent / "adapter_config.json").is_file()  # peft can load the copy's folder


def test_pickle_weights_are_unpickled_once_then_read_from_the_copy(
    adapter_copy: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import engines.adapters.pickle_weights

    folder = adapter_copy()
    pickle_from_safetensors(folder)
    first = read(folder).weights_file

    def never(*args: object) -> None:
        raise AssertionError("unpickled again")

    monkeypatch.setattr(engines.adapters.pickle_weights, "read_pickle_tensors", never)
    assert read(folder).weights_file == first


class RunsCode:
    """A pickle payload that would create a file if unpickling ever ran it."""

    marker = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_a_pickle_whose_payload_would_run_code_is_refused_and_never_runs(
    adapter_copy: Callable[..., Path], tmp_path: Path
) -> None:
    folder = adapter_copy()
    tensors = pickle_from_safetensors(folder)
    marker = tmp_path / "payload-ran"
    payload = RunsCode()
    payload.marker = str(marker)
    torch.save({**tensors, "extra": payload}, folder / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match="refused without running it"):
        read(folder)
    assert not marker.exists()


def test_a_pickle_holding_anything_but_named_tensors_is_refused(adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy()
    tensors = pickle_from_safetensors(folder)
    torch.save({**tensors, "note": [1, 2, 3]}, folder / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match="not a named tensor"):
        read(folder)


def test_ranks_come_from_the_tensors_not_the_config(adapter_copy: Callable[..., Path]) -> None:
    from safetensors.torch import load_file, save_file

    folder = adapter_copy()
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    bigger = {
        key: torch.zeros(64, value.shape[1]) if "lora_A" in key else torch.zeros(value.shape[0], 64)
        for key, value in tensors.items()
    }
    save_file(bigger, str(weights))
    with pytest.raises(AdapterRejected, match=r"has rank 64 but adapter_config\.json declares"):
        check_tensor_ranks(read(folder), AdapterPolicy())
    with pytest.raises(AdapterRejected, match=r"rank 64 .* above this gateway's maximum of 32"):
        check_tensor_ranks(read(folder), AdapterPolicy(max_rank=32))


def test_safetensors_are_preferred_over_pickle(adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy()
    (folder / "adapter_model.bin").write_bytes(b"never unpickled")
    for policy in (AdapterPolicy(), AdapterPolicy(allow_pickle=False)):
        assert read(folder, policy).weights_file == folder / "adapter_model.safetensors"


def test_missing_weights_are_refused(adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy()
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRejected, match="weights"):
        read(folder)


def test_missing_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterRejected, match=r"adapter_config\.json"):
        read(tmp_path)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_unreadable_config_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(AdapterRejected, match="unreadable"):
        read(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", '"LORA"', "null"])
def test_config_that_is_not_an_object_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "adapter_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(AdapterRejected, match="JSON object"):
        read(tmp_path)


# --- check_base_match ------------------------------------------------------------------------------------


def files_declaring(declared: str | None, tmp_path: Path) -> AdapterFiles:
    folder = make_adapter_folder(tmp_path / "a", lora_config(base_model_name_or_path=declared))
    return read(folder)


@pytest.mark.parametrize(
    "declared",
    [
        "tiny",  # the configured name
        "test-org/tiny-base",  # the configured source
        "tiny-alias",  # an alias
        "/home/someone/models/tiny-base",  # a local copy: same last path component as the source
        "mirror-org/tiny-base",  # a mirror on the Hub
        "TEST-ORG/Tiny-Base/",  # case and a trailing slash do not matter
    ],
)
def test_declared_base_matching_name_source_alias_or_last_component_passes(
    tmp_path: Path, declared: str
) -> None:
    check_base_match(files_declaring(declared, tmp_path), BASE, AdapterPolicy(base_match="strict"))


def test_declared_base_matching_a_local_source_by_last_component_passes(tmp_path: Path) -> None:
    base = BaseSpec(name="local", source="/srv/models/SmolLM2-135M")
    check_base_match(files_declaring("HuggingFaceTB/SmolLM2-135M", tmp_path), base, AdapterPolicy())


def test_adapter_without_declared_base_passes(tmp_path: Path) -> None:
    config = lora_config()
    del config["base_model_name_or_path"]
    folder = make_adapter_folder(tmp_path / "a", config)
    check_base_match(read(folder), BASE, AdapterPolicy(base_match="strict"))


def test_mismatching_base_is_refused_in_strict_mode(tmp_path: Path) -> None:
    files = files_declaring("meta-llama/Llama-3.1-8B", tmp_path)
    with pytest.raises(AdapterRejected, match=r"Llama-3\.1-8B") as info:
        check_base_match(files, BASE, AdapterPolicy(base_match="strict"))
    assert "base_match" in info.value.message


def test_mismatching_base_is_only_logged_in_warn_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = files_declaring("meta-llama/Llama-3.1-8B", tmp_path)
    with caplog.at_level(logging.WARNING, logger="peft_gateway.adapters"):
        check_base_match(files, BASE, AdapterPolicy(base_match="warn"))
    assert any("Llama-3.1-8B" in record.getMessage() for record in caplog.records)


def test_a_longer_name_sharing_the_base_name_as_prefix_does_not_match(tmp_path: Path) -> None:
    with pytest.raises(AdapterRejected):
        check_base_match(files_declaring("test-org/tiny-base-instruct", tmp_path), BASE, AdapterPolicy())


# --- check_adapter_fits (engines/loader.py) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_base(tiny_models: TinyModels) -> LoadedModel:
    return load_base(BaseSpec(name="tiny", source=str(tiny_models.base), dtype="float32"))


@pytest.fixture(scope="module")
def foreign_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters made for models of another size: wider (hidden 128) and deeper (3 layers)."""
    root = tmp_path_factory.mktemp("foreign")
    wide = save_tiny_base(root / "wide-base", TinyShape(hidden_size=128, intermediate_size=256))
    deep = save_tiny_base(root / "deep-base", TinyShape(num_hidden_layers=3))
    return {
        "wide": save_tiny_adapter(wide, root / "wide-lora"),
        "deep": save_tiny_adapter(deep, root / "deep-lora"),
    }


def test_adapter_made_for_this_base_fits(loaded_base: LoadedModel, tiny_models: TinyModels) -> None:
    check_adapter_fits(read(tiny_models.adapter), loaded_base)


def test_target_modules_missing_in_the_base_are_refused(
    loaded_base: LoadedModel, adapter_copy: Callable[..., Path]
) -> None:
    files = read(adapter_copy(target_modules=["q_proj", "query_key_value"]))
    with pytest.raises(AdapterRejected, match="query_key_value") as info:
        check_adapter_fits(files, loaded_base)
    assert "q_proj" not in info.value.message.split("does not")[0]


def test_target_module_regex_matching_nothing_is_refused(
    loaded_base: LoadedModel, adapter_copy: Callable[..., Path]
) -> None:
    files = read(adapter_copy(target_modules=r".*\.attention\.dense"))
    with pytest.raises(AdapterRejected, match="has none"):
        check_adapter_fits(files, loaded_base)


def test_target_module_regex_matching_base_modules_fits(
    loaded_base: LoadedModel, adapter_copy: Callable[..., Path]
) -> None:
    check_adapter_fits(read(adapter_copy(target_modules=r".*\.(q_proj|v_proj)")), loaded_base)


def test_adapter_for_a_bigger_hidden_size_is_refused_with_a_size_message(
    loaded_base: LoadedModel, foreign_adapters: dict[str, Path]
) -> None:
    with pytest.raises(AdapterRejected, match="size") as info:
        check_adapter_fits(read(foreign_adapters["wide"]), loaded_base)
    assert "128" in info.value.message
    assert "64" in info.value.message


def test_adapter_for_more_layers_is_refused(
    loaded_base: LoadedModel, foreign_adapters: dict[str, Path]
) -> None:
    with pytest.raises(AdapterRejected, match=r"layers\.2"):
        check_adapter_fits(read(foreign_adapters["deep"]), loaded_base)


def test_corrupt_weights_file_is_refused(loaded_base: LoadedModel, adapter_copy: Callable[..., Path]) -> None:
    folder = adapter_copy()
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(AdapterRejected, match="corrupt"):
        check_adapter_fits(read(folder), loaded_base)


def pickle_from_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Turn an adapter folder into a pickle-only one (as FlagAlpha's adapter ships); its tensors."""
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    torch.save(tensors, folder / "adapter_model.bin")
    weights.unlink()
    return tensors
