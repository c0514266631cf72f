"""load_base and build_variant: a merged variant equals peft's own merge and shares untargeted tensors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engines.adapters.files import AdapterFiles, AdapterRef, read_adapter_files
from engines.adapters.variants import build_variant
from engines.catalog import AdapterPolicy, BaseSpec
from engines.errors import AdapterRejected, ModelLoadFailed
from engines.loader import LoadedModel, load_base, tensor_bytes
from engines.testing.tiny import build_byte_tokenizer, save_tiny_adapter
from tests.conftest import TinyModels

PROMPT = "Hello, 世界! The blue whale"
TARGETED = ("q_proj", "v_proj")


def spec_for(tiny_models: TinyModels, dtype: str = "float32", **kwargs: Any) -> BaseSpec:
    return BaseSpec(name="tiny", source=str(tiny_models.base), dtype=dtype, **kwargs)


def read(folder: Path) -> AdapterFiles:
    return read_adapter_files(AdapterRef(kind="local", source=str(folder)), folder, AdapterPolicy())


def prompt_ids(model: LoadedModel) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(PROMPT, add_special_tokens=False)])


@torch.no_grad()
def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def peft_reference(tiny_models: TinyModels, adapter: Path, dtype: torch.dtype) -> Any:
    """peft's own answer: a freshly loaded base, the adapter applied and merged the ordinary way."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_models.base, dtype=dtype)
    return PeftModel.from_pretrained(fresh, str(adapter)).merge_and_unload().eval()


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pointers(model: Any) -> dict[str, int]:
    return {name: param.data_ptr() for name, param in model.named_parameters()}


def is_targeted(name: str) -> bool:
    return any(f".{module}." in name for module in TARGETED)


@pytest.fixture(scope="module")
def base32(tiny_models: TinyModels) -> LoadedModel:
    return load_base(spec_for(tiny_models, "float32"))


@pytest.fixture(scope="module")
def base16(tiny_models: TinyModels) -> LoadedModel:
    return load_base(spec_for(tiny_models, "bfloat16"))


@pytest.fixture(scope="module")
def mlp_adapter(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlp") / "mlp-lora"
    return save_tiny_adapter(tiny_models.base, folder, target_modules=("gate_proj", "down_proj"), seed=7)


# --- load_base --------------------------------------------------------------------------------------------


def test_load_base_float32(base32: LoadedModel, tiny_models: TinyModels) -> None:
    assert base32.name == "tiny"
    assert base32.dtype == "float32"
    assert base32.device == "cpu"
    assert base32.root == str(tiny_models.base)
    assert base32.parent is None
    assert {param.dtype for param in base32.model.parameters()} == {torch.float32}


def test_load_base_bfloat16(base16: LoadedModel) -> None:
    assert base16.dtype == "bfloat16"
    assert {param.dtype for param in base16.model.parameters()} == {torch.bfloat16}


def test_bfloat16_base_takes_half_the_parameter_bytes(base32: LoadedModel, base16: LoadedModel) -> None:
    # Rotary inv_freq buffers stay float32 in both, so only the parameters halve.
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in base32.model.buffers())
    assert buffers == sum(buffer.numel() * buffer.element_size() for buffer in base16.model.buffers())
    assert (base16.nbytes - buffers) * 2 == base32.nbytes - buffers


def test_nbytes_counts_every_parameter_once(base32: LoadedModel) -> None:
    params = sum(param.numel() * param.element_size() for param in base32.model.parameters())
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in base32.model.buffers())
    assert base32.nbytes == params + buffers


def test_auto_dtype_follows_native_bf16_support(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engines import devices
    from engines.forward.kernels import NativeKernels

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(NativeKernels, "load", lambda: None)  # without the compiled float32 step
    assert load_base(spec_for(tiny_models, "auto")).dtype == "bfloat16"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))
    assert load_base(spec_for(tiny_models, "auto")).dtype == "float32"


def test_loaded_base_is_frozen_and_in_eval_mode(base32: LoadedModel) -> None:
    assert not base32.model.training
    assert not any(param.requires_grad for param in base32.model.parameters())


def test_loaded_base_knows_its_tokenizer_eos_and_context(base32: LoadedModel) -> None:
    assert base32.tokenizer.chat_template
    assert base32.tokenizer.convert_tokens_to_ids("<|im_end|>") in base32.eos_token_ids
    assert base32.context_length == 512


def test_configured_context_length_wins(tiny_models: TinyModels) -> None:
    assert load_base(spec_for(tiny_models, context_length=128)).context_length == 128


def test_missing_base_folder_fails_to_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        load_base(BaseSpec(name="gone", source=str(tmp_path / "gone")))


def test_corrupt_base_folder_fails_to_load(tiny_models: TinyModels, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models.base, folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ModelLoadFailed, match="broken"):
        load_base(BaseSpec(name="broken", source=str(folder)))


# --- build_variant ----------------------------------------------------------------------------------------


def test_building_a_variant_leaves_the_base_state_dict_bit_identical(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    before = snapshot(base32.model)
    before_pointers = pointers(base32.model)
    build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    after = base32.model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert pointers(base32.model) == before_pointers


def test_building_a_bf16_variant_leaves_the_bf16_base_bit_identical(
    tiny_models: TinyModels, base16: LoadedModel
) -> None:
    before = snapshot(base16.model)
    build_variant(base16, read(tiny_models.adapter), "tiny+lora")
    for name, tensor in base16.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_base_output_is_unchanged_after_building_a_variant(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    ids = prompt_ids(base32)
    before = logits_of(base32.model, ids)
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    assert not torch.equal(logits_of(variant.model, ids), before)
    assert torch.equal(logits_of(base32.model, ids), before)


def test_base_module_tree_keeps_its_plain_linear_layers(tiny_models: TinyModels, base32: LoadedModel) -> None:
    build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    names = [name for name, _ in base32.model.named_modules()]
    assert not any("lora" in name or "base_layer" in name for name in names)
    assert type(base32.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_variant_has_no_lora_modules_left(tiny_models: TinyModels, base32: LoadedModel) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    assert type(variant.model) is type(base32.model)
    assert not any("lora" in name for name, _ in variant.model.named_modules())
    assert dict(variant.model.named_parameters()).keys() == dict(base32.model.named_parameters()).keys()


def test_fp32_variant_logits_equal_peft_merge_and_unload(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    reference = peft_reference(tiny_models, tiny_models.adapter, torch.float32)
    ids = prompt_ids(base32)
    torch.testing.assert_close(logits_of(variant.model, ids), logits_of(reference, ids), rtol=0, atol=1e-6)


def test_fp32_variant_weights_equal_peft_merge_and_unload(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    reference = dict(peft_reference(tiny_models, tiny_models.adapter, torch.float32).named_parameters())
    for name, param in variant.model.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=1e-7, msg=name)


def test_bf16_variant_logits_match_peft_merge_and_unload(
    tiny_models: TinyModels, base16: LoadedModel
) -> None:
    variant = build_variant(base16, read(tiny_models.adapter), "tiny+lora")
    reference = peft_reference(tiny_models, tiny_models.adapter, torch.bfloat16)
    ids = prompt_ids(base16)
    assert {param.dtype for param in variant.model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits_of(variant.model, ids), logits_of(reference, ids), rtol=0, atol=2e-2)


def test_merged_weight_is_w_plus_scale_b_a(tiny_models: TinyModels, base32: LoadedModel) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    weights = load_file(str(tiny_models.adapter / "adapter_model.safetensors"))
    scale = 8 / 4  # lora_alpha / r as written by save_tiny_adapter
    for layer in range(2):
        for module in TARGETED:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            delta = scale * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            base_weight = base32.model.get_parameter(name)
            torch.testing.assert_close(variant.model.get_parameter(name), base_weight + delta)


def test_untargeted_parameters_share_storage_with_the_base(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    base_pointers, variant_pointers = pointers(base32.model), pointers(variant.model)
    shared = [name for name in base_pointers if not is_targeted(name)]
    assert shared  # embeddings, norms, k/o/mlp projections, lm_head
    for name in shared:
        assert variant_pointers[name] == base_pointers[name], name


def test_targeted_parameters_have_their_own_storage(tiny_models: TinyModels, base32: LoadedModel) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    base_pointers, variant_pointers = pointers(base32.model), pointers(variant.model)
    targeted = [name for name in base_pointers if is_targeted(name)]
    assert len(targeted) == 2 * len(TARGETED)
    for name in targeted:
        assert variant_pointers[name] != base_pointers[name], name


def test_variant_buffers_share_storage_with_the_base(tiny_models: TinyModels, base32: LoadedModel) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    base_buffers = {name: buffer.data_ptr() for name, buffer in base32.model.named_buffers()}
    assert {name: buffer.data_ptr() for name, buffer in variant.model.named_buffers()} == base_buffers


@pytest.mark.parametrize("fixture", ["base32", "base16"])
def test_variant_nbytes_equals_the_targeted_weights_bytes(
    tiny_models: TinyModels, fixture: str, request: pytest.FixtureRequest
) -> None:
    base: LoadedModel = request.getfixturevalue(fixture)
    variant = build_variant(base, read(tiny_models.adapter), "tiny+lora")
    targeted = [param for name, param in base.model.named_parameters() if is_targeted(name)]
    assert variant.nbytes == sum(param.numel() * param.element_size() for param in targeted)
    assert variant.nbytes < base.nbytes / 4


def test_variant_holds_nothing_beyond_the_base_but_its_nbytes(
    tiny_models: TinyModels, base32: LoadedModel
) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+lora")
    # The base's q/k/v share one buffer (fused projections), which the variant keeps through k.
    assert tensor_bytes(variant.model) == base32.nbytes + variant.nbytes


def test_variant_records_parent_root_and_base_facts(tiny_models: TinyModels, base32: LoadedModel) -> None:
    variant = build_variant(base32, read(tiny_models.adapter), "tiny+tiny-lora")
    assert variant.name == "tiny+tiny-lora"
    assert variant.parent == "tiny"
    assert variant.root == str(tiny_models.adapter)
    assert variant.tokenizer is base32.tokenizer
    assert (variant.dtype, variant.device, variant.context_length) == ("float32", "cpu", 512)
    assert variant.eos_token_ids == base32.eos_token_ids
    assert not variant.model.training


def test_two_variants_of_one_base_do_not_interfere(
    tiny_models: TinyModels, base32: LoadedModel, mlp_adapter: Path
) -> None:
    ids = prompt_ids(base32)
    attention = build_variant(base32, read(tiny_models.adapter), "tiny+attn")
    attention_logits = logits_of(attention.model, ids)
    mlp = build_variant(base32, read(mlp_adapter), "tiny+mlp")
    assert torch.equal(logits_of(attention.model, ids), attention_logits)
    reference = peft_reference(tiny_models, mlp_adapter, torch.float32)
    torch.testing.assert_close(logits_of(mlp.model, ids), logits_of(reference, ids), rtol=0, atol=1e-6)
    assert not torch.equal(logits_of(mlp.model, ids), attention_logits)


def test_adapter_shipping_the_same_tokenizer_uses_its_own(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(tiny_models.adapter, folder)
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(folder)
    variant = build_variant(base32, read(folder), "tiny+tok")
    assert variant.tokenizer is not base32.tokenizer
    assert variant.tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_adapter_shipping_a_resized_vocabulary_is_refused(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = tmp_path / "resized"
    shutil.copytree(tiny_models.adapter, folder)
    tokenizer = build_byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(AdapterRejected, match="vocabulary"):
        build_variant(base32, read(folder), "tiny+resized")


# --- adapters whose weights cannot be merged --------------------------------------------------------------


def copy_adapter(tiny_models: TinyModels, folder: Path) -> Path:
    shutil.copytree(tiny_models.adapter, folder)
    return folder


def saved_weights(tiny_models: TinyModels) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_models.adapter / "adapter_model.safetensors"))


def test_pickle_weights_merge_like_safetensors_when_allowed(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "pickled")
    torch.save(saved_weights(tiny_models), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    ref = AdapterRef(kind="local", source=str(folder))
    files = read_adapter_files(ref, folder, AdapterPolicy())
    pickled = build_variant(base32, files, "tiny+pickled")
    safe = build_variant(base32, read(tiny_models.adapter), "tiny+safe")
    ids = prompt_ids(base32)
    assert torch.equal(logits_of(pickled.model, ids), logits_of(safe.model, ids))


def test_corrupt_pickle_weights_are_refused(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "bad-pickle")
    (folder / "adapter_model.bin").write_bytes(b"this is not a pickle")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRejected, match="or is damaged"):
        read_adapter_files(AdapterRef(kind="local", source=str(folder)), folder, AdapterPolicy())


def test_corrupt_safetensors_weights_are_refused(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "bad-safetensors")
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(AdapterRejected, match="could not be merged"):
        build_variant(base32, read(folder), "tiny+bad")


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_weights_file_without_lora_matrices_is_refused(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "empty")
    save_file({}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterRejected, match=r"holds no LoRA matrices|does not hold"):
        build_variant(base32, read(folder), "tiny+empty")


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_weights_file_missing_some_layers_is_refused(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "partial")
    layer0 = {key: value for key, value in saved_weights(tiny_models).items() if ".layers.0." in key}
    save_file(layer0, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterRejected, match=r"layers\.1"):
        build_variant(base32, read(folder), "tiny+partial")


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_refused_variant_leaves_the_base_untouched(
    tiny_models: TinyModels, base32: LoadedModel, tmp_path: Path
) -> None:
    folder = copy_adapter(tiny_models, tmp_path / "empty")
    save_file({}, str(folder / "adapter_model.safetensors"))
    before = snapshot(base32.model)
    with pytest.raises(AdapterRejected):
        build_variant(base32, read(folder), "tiny+empty")
    for name, tensor in base32.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_sampling_defaults_come_only_from_explicit_generation_config_keys(tmp_path: Path) -> None:
    from engines.loader import read_sampling_defaults

    assert read_sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "top_p": 0.9, "eos_token_id": 2}')
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_k": 20, "do_sample": true}')
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_k": 20.0}


def test_the_vocabulary_is_counted_once_per_tokenizer() -> None:
    """Counting a transformers tokenizer rebuilds its vocabulary; requests check ids against the count."""
    from engines.loader import LoadedModel

    class CountedTokenizer:
        def __init__(self, size: int) -> None:
            self.size, self.counted = size, 0

        def __len__(self) -> int:
            self.counted += 1
            return self.size

    first = CountedTokenizer(97)
    loaded = LoadedModel("m", None, first, "float32", "cpu", 64, frozenset(), 0, 0.0)
    assert [loaded.vocab_size for _ in range(3)] == [97, 97, 97]
    assert first.counted == 1
    loaded.tokenizer = CountedTokenizer(120)  # another tokenizer: counted afresh, not the stale size
    assert loaded.vocab_size == 120
