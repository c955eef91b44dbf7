"""save_adapter / load_adapter: PEFT's file format, error handling, and interop with PEFT in both directions."""

import copy
import json
import os
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mrgfast.layers import LoRALinear
from mrgfast.peft import (LoraConfig, adapter_io, adapter_state_dict, apply_lora, disable_adapters, load_adapter,
                          save_adapter)
from tests.peft.trainable import randomize_trainable


def logits(model, ids):
    """Model output in eval mode without grad: a tensor for torch models, `.logits` for HF models."""
    model.eval()
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


# ---------------------------------------------------------------- format and round trip (no PEFT needed)

def test_files_keys_and_metadata_are_peft_format(toy_model, tmp_path):
    apply_lora(toy_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert save_adapter(toy_model, tmp_path, base_model_name_or_path="toy/base") == tmp_path
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (2, 16)
        assert f.get_tensor("base_model.model.layers.0.self_attn.q_proj.lora_B.weight").shape == (16, 2)
    assert keys == {f"base_model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"} \
        | {"base_model.model.lm_head.weight"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4
    assert config["base_model_name_or_path"] == "toy/base" and config["modules_to_save"] == ["lm_head"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    # The config gets the usual mode, as PEFT writes it, not a private temp-file mode (safetensors itself
    # creates its files 0600, for PEFT too).
    assert (tmp_path / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_round_trip_into_a_fresh_model(toy_model, toy_ids, tmp_path, bias):
    fresh = copy.deepcopy(toy_model)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias,
                        modules_to_save=["lm_head"], use_rslora=True)
    apply_lora(toy_model, config)
    randomize_trainable(toy_model)
    save_adapter(toy_model, tmp_path)
    load_adapter(fresh, tmp_path)
    assert isinstance(fresh.layers[1].mlp.down_proj, LoRALinear)
    assert torch.equal(logits(fresh, toy_ids), logits(toy_model, toy_ids))


def test_loading_into_an_eval_model_adds_no_dropout(toy_model, toy_ids, tmp_path):
    """As PEFT's from_pretrained gives an eval model: the new LoRA modules take the model's mode, so a loaded model's
    outputs are deterministic without another .eval()."""
    fresh, training = copy.deepcopy(toy_model), copy.deepcopy(toy_model).train()  # toy_model is in eval mode
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    apply_lora(toy_model, config)
    randomize_trainable(toy_model)
    save_adapter(toy_model, tmp_path)
    load_adapter(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(toy_ids), fresh(toy_ids))
    apply_lora(training, config)  # a model in train mode gets adapters in train mode
    assert all(m.training for m in training.modules())


def test_load_into_a_model_that_already_has_the_same_lora(toy_model, toy_ids, tmp_path):
    other = copy.deepcopy(toy_model)
    config = LoraConfig(r=2, target_modules=["v_proj"])
    apply_lora(toy_model, config)
    apply_lora(other, config)
    randomize_trainable(toy_model)
    save_adapter(toy_model, tmp_path)
    load_adapter(other, tmp_path)
    assert torch.equal(logits(other, toy_ids), logits(toy_model, toy_ids))


def test_load_into_a_different_lora_is_an_error(toy_model, tmp_path):
    other = copy.deepcopy(toy_model)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["v_proj"]))
    apply_lora(other, LoraConfig(r=4, target_modules=["v_proj"]))
    save_adapter(toy_model, tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json: r=2, but the model's LoRA has r=4"):
        load_adapter(other, tmp_path)


def test_key_mismatch_names_keys_and_file_and_leaves_model_untouched(toy_model, tmp_path):
    fresh = copy.deepcopy(toy_model)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(toy_model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors.pop("base_model.model.layers.1.self_attn.q_proj.lora_B.weight")
    tensors["base_model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 16)
    save_file(tensors, file, metadata={"format": "pt"})
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(str(file)) + r".*missing: \['base_model.model.layers.1.self_attn"
                                         r".q_proj.lora_B.weight'\].*unexpected: \['.*k_proj.lora_A.weight'\]"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and before.keys() == \
        fresh.state_dict().keys()
    assert all(p.requires_grad for p in fresh.parameters())


def test_shape_mismatch_is_an_error(toy_model, tmp_path):
    apply_lora(copy.deepcopy(toy_model), LoraConfig(r=2, target_modules=["q_proj"]))
    adapted = apply_lora(copy.deepcopy(toy_model), LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(adapted, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 15)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(2, 15\), the model expects \(2, 16\)"):
        load_adapter(toy_model, tmp_path)


def test_failed_save_keeps_the_previous_files(toy_model, tmp_path, monkeypatch):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(toy_model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_trainable(toy_model)

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(toy_model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "old files intact, no temp files left"


def test_save_without_lora_or_inside_disable_is_an_error(toy_model, tmp_path):
    with pytest.raises(ValueError, match="save_adapter: the model has no LoRA adapter"):
        save_adapter(toy_model, tmp_path)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with disable_adapters(toy_model), pytest.raises(ValueError, match="inside disable_adapters"):
        save_adapter(toy_model, tmp_path)


def test_load_from_a_directory_without_weights_is_an_error(toy_model, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict()))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_adapter(toy_model, tmp_path)


def test_corrupt_weights_file_is_an_error_naming_it(toy_model, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict()))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(toy_model, tmp_path)


def test_legacy_bin_is_loaded_with_weights_only(toy_model, toy_ids, tmp_path):
    fresh = copy.deepcopy(toy_model)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_trainable(toy_model)
    save_adapter(toy_model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "adapter_model.bin")
    weights.unlink()
    load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh, toy_ids), logits(toy_model, toy_ids))


class Payload:
    """An object whose unpickling would run code (it creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_a_bin_is_refused(toy_model, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_dict()))
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin: refused to load"):
        load_adapter(toy_model, tmp_path)
    assert not marker.exists()


def test_adapter_state_dict_maps_lora_only_bias_to_peft_base_layer_key(toy_model):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    keys = set(adapter_state_dict(toy_model))
    assert "base_model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert not any(k.endswith("k_proj.bias") for k in keys)


# ---------------------------------------------------------------- interop with PEFT on tiny HF models

INTEROP_CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True,
                   modules_to_save=["lm_head"])),
    ("llama", dict(r=2, lora_alpha=4, target_modules=r".*\.1\.self_attn\.(k|v)_proj", lora_dropout=0.1)),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all", modules_to_save=["lm_head"])),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all", modules_to_save=["k_proj"])),
]
CASE_IDS = ["llama-qv", "llama-rslora-saved", "llama-regex", "qwen2-qkv", "qwen2-lora_only", "qwen2-all-saved",
            "qwen2-all-saved-with-bias"]


def peft_load(peft, base, path):
    """PeftModel.from_pretrained, failing on PEFT's missing-adapter-keys warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(path))
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return model


@pytest.mark.parametrize("arch, settings", INTEROP_CASES, ids=CASE_IDS)
def test_mrgfast_adapter_loads_in_peft(fresh_hf, hf_ids, tmp_path, arch, settings):
    import peft
    model = apply_lora(fresh_hf(arch), LoraConfig(**settings))
    randomize_trainable(model)
    save_adapter(model, tmp_path)
    peft_model = peft_load(peft, fresh_hf(arch), tmp_path)
    ours, theirs, base = logits(model, hf_ids), logits(peft_model, hf_ids), logits(fresh_hf(arch), hf_ids)
    assert not torch.allclose(ours, base, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, settings", INTEROP_CASES, ids=CASE_IDS)
def test_peft_adapter_loads_in_mrgfast(fresh_hf, hf_ids, tmp_path, arch, settings):
    import peft
    peft_model = peft.get_peft_model(fresh_hf(arch), peft.LoraConfig(task_type="CAUSAL_LM", **settings))
    randomize_trainable(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = load_adapter(fresh_hf(arch), tmp_path)
    ours, theirs, base = logits(model, hf_ids), logits(peft_model, hf_ids), logits(fresh_hf(arch), hf_ids)
    assert not torch.allclose(theirs, base, atol=1e-3), "the adapter must change the output"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if settings.get("bias", "none") == "none":
        # PEFT leaves trained biases in place when disabled; without them both must give the base model.
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(peft_model, hf_ids), base, rtol=1e-5, atol=1e-5)
    with disable_adapters(model):
        assert torch.equal(logits(model, hf_ids), base)


def test_same_seed_gives_peft_initial_weights(fresh_hf):
    import peft
    torch.manual_seed(11)
    ours = apply_lora(fresh_hf("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(fresh_hf("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                    task_type="CAUSAL_LM"))
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    ours_sd = adapter_state_dict(ours)
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in ours_sd.items():
        assert torch.equal(value, theirs_sd[key]), key
