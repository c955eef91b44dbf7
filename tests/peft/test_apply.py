"""apply_lora / remove_lora / disable_adapters on a plain torch model: matching, trainability, base exactness."""

import copy

import pytest
import torch
from torch import nn

from mrgfast.layers import LoRALinear
from mrgfast.peft import LoraConfig, apply_lora, disable_adapters, get_lora_config, remove_lora
from tests.peft.trainable import randomize_trainable


def lora_paths(model):
    """Sorted paths of the LoRALinear modules in `model`."""
    return sorted(name for name, module in model.named_modules() if isinstance(module, LoRALinear))


def trainable(model):
    """Sorted names of the parameters that require grad."""
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                            "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]),
    (["layers.1.self_attn.q_proj"], ["layers.1.self_attn.q_proj"]),           # exact full path
    (["self_attn.o_proj"], ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"]),  # multi-part suffix
    (["lm_head", "0.mlp.up_proj"], ["layers.0.mlp.up_proj", "lm_head"]),
])
def test_suffix_and_exact_matching(toy_model, targets, expected):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=targets))
    assert lora_paths(toy_model) == expected


def test_suffix_must_follow_a_dot(toy_model):
    # "_proj" is a string suffix of every projection but not a '.'-separated name: PEFT matches nothing.
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["_proj"]))


def test_regex_is_fullmatched_against_the_path(toy_model):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert lora_paths(toy_model) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]


def test_regex_that_only_matches_a_suffix_matches_nothing(toy_model):
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules="q_proj"))


@pytest.mark.parametrize("exclude, expected", [
    (["layers.1.self_attn.v_proj"], ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                                     "layers.1.self_attn.q_proj"]),
    (r"layers\.0\..*", ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]),
    (["v_proj"], ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]),
])
def test_exclude_modules(toy_model, exclude, expected):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=exclude))
    assert lora_paths(toy_model) == expected


def test_excluding_everything_is_an_error(toy_model):
    with pytest.raises(ValueError, match="matches no module.*exclude_modules"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_no_match_error_names_patterns_and_linear_modules(toy_model):
    with pytest.raises(ValueError, match=r"\['qkv'\].*ToyModel.*'q_proj'.*'lm_head'"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["qkv"]))
    assert lora_paths(toy_model) == []


def test_matching_a_non_linear_module_is_an_error(toy_model):
    with pytest.raises(ValueError, match="'layers.0.self_attn', a ToyAttention"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "self_attn"]))
    assert lora_paths(toy_model) == [], "a rejected config leaves the model untouched"


def test_matching_a_custom_linear_or_mha_out_proj_is_an_error():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.ModuleDict({"custom": Custom(4, 4), "attn": nn.MultiheadAttention(4, 2)})
    with pytest.raises(ValueError, match="own forward"):
        apply_lora(model, LoraConfig(r=2, target_modules=["custom"]))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_lora(model, LoraConfig(r=2, target_modules=["out_proj"]))


def test_unset_target_modules_is_an_error(toy_model):
    with pytest.raises(ValueError, match="target_modules is not set"):
        apply_lora(toy_model, LoraConfig(r=2))


def test_unknown_modules_to_save_is_an_error(toy_model):
    with pytest.raises(ValueError, match=r"modules_to_save entries \['classifier'\]"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_applying_twice_is_an_error(toy_model):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["v_proj"]))


def test_non_module_or_non_config_is_an_error(toy_model):
    with pytest.raises(ValueError, match="nn.Module"):
        apply_lora(object(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoraConfig"):
        apply_lora(toy_model, {"r": 2, "target_modules": ["q_proj"]})


def test_layer_settings_come_from_the_config(toy_model):
    apply_lora(toy_model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["k_proj"]))
    layer = toy_model.layers[0].self_attn.k_proj
    assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.scaling) == (4, 16, 0.1, 8.0)
    assert get_lora_config(toy_model).target_modules == ["k_proj"]


def test_base_state_dict_keys_are_unchanged(toy_model):
    before = set(toy_model.state_dict())
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"]))
    added = set(toy_model.state_dict()) - before
    assert before <= set(toy_model.state_dict())
    assert added == {f"layers.{i}.{m}.lora_{ab}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
                     for ab in "AB"}


def test_fresh_adapter_leaves_outputs_unchanged(toy_model, toy_ids):
    with torch.no_grad():
        before = toy_model(toy_ids)
        apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.testing.assert_close(toy_model(toy_ids), before, rtol=1e-6, atol=1e-6)


LORA_QV = [f"layers.{i}.self_attn.{m}_proj.lora_{ab}.weight" for i in (0, 1) for m in "qv" for ab in "AB"]


@pytest.mark.parametrize("bias, modules_to_save, extra", [
    ("none", None, []),
    ("none", ["lm_head"], ["lm_head.weight"]),
    ("lora_only", None, [f"layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "qv"]),
    ("all", None, [f"layers.{i}.{m}.bias" for i in (0, 1) for m in
                   ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "mlp.up_proj", "mlp.down_proj")] + ["norm.bias"]),
    ("none", ["mlp"], [f"layers.{i}.mlp.{m}_proj.{p}" for i in (0, 1) for m in ("up", "down")
                       for p in ("weight", "bias")]),
])
def test_only_adapters_and_named_extras_require_grad(toy_model, bias, modules_to_save, extra):
    for p in toy_model.parameters():
        p.requires_grad_(True)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias,
                                     modules_to_save=modules_to_save))
    assert trainable(toy_model) == sorted(LORA_QV + extra)


def test_modules_to_save_are_never_lora_targets(toy_model):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "up_proj"], modules_to_save=["mlp"]))
    assert lora_paths(toy_model) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


def test_gradients_reach_only_trainable_parameters(toy_model, toy_ids):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    randomize_trainable(toy_model, seed=3)
    toy_model.train()
    toy_model(toy_ids).square().mean().backward()
    with_grad = sorted(n for n, p in toy_model.named_parameters() if p.grad is not None)
    assert with_grad == trainable(toy_model)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_disable_adapters_computes_the_base_exactly(toy_model, toy_ids, bias):
    with torch.no_grad():
        base_out = toy_model(toy_ids)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias,
                                     modules_to_save=["lm_head", "input_layernorm"]))
    randomize_trainable(toy_model, seed=3)
    with torch.no_grad():
        adapted = toy_model(toy_ids)
        assert not torch.allclose(adapted, base_out)
        with disable_adapters(toy_model) as same:
            assert same is toy_model
            assert torch.equal(toy_model(toy_ids), base_out)
        assert torch.equal(toy_model(toy_ids), adapted), "leaving the block restores the adapter"


def test_disable_adapters_restores_on_exception(toy_model, toy_ids):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_trainable(toy_model, seed=3)
    lm_head_weight = toy_model.lm_head.weight
    with torch.no_grad():
        adapted = toy_model(toy_ids)
        with pytest.raises(RuntimeError, match="boom"):
            with disable_adapters(toy_model):
                raise RuntimeError("boom")
        assert torch.equal(toy_model(toy_ids), adapted)
    assert toy_model.lm_head.weight is lm_head_weight
    assert not toy_model.layers[0].self_attn.q_proj.disable_adapters


def test_disable_adapters_nests_and_handles_merged_layers(toy_model, toy_ids):
    with torch.no_grad():
        base_out = toy_model(toy_ids)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(toy_model, seed=3)
    merged_layer = toy_model.layers[1].self_attn.v_proj
    merged_layer.merge()
    with torch.no_grad():
        adapted = toy_model(toy_ids)
        with disable_adapters(toy_model):
            torch.testing.assert_close(toy_model(toy_ids), base_out, rtol=1e-5, atol=1e-5)
            with disable_adapters(toy_model):
                torch.testing.assert_close(toy_model(toy_ids), base_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(toy_model(toy_ids), base_out, rtol=1e-5, atol=1e-5)
        assert merged_layer.merged, "a layer merged before the block is merged again after it"
        torch.testing.assert_close(toy_model(toy_ids), adapted, rtol=1e-5, atol=1e-5)


def test_trained_weights_keep_their_gradients_outside_the_block(toy_model, toy_ids):
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_trainable(toy_model, seed=3)
    policy_loss = toy_model(toy_ids).square().mean()
    with torch.no_grad(), disable_adapters(toy_model):
        reference = toy_model(toy_ids)
    (policy_loss - reference.mean()).backward()
    assert toy_model.lm_head.weight.grad is not None and toy_model.lm_head.weight.grad.abs().sum() > 0


def test_disable_without_lora_is_an_error(toy_model):
    with pytest.raises(ValueError, match="disable_adapters: the model has no LoRA adapter"):
        with disable_adapters(toy_model):
            pass


def test_remove_lora_restores_the_base_model(toy_model, toy_ids):
    toy_model.layers[0].self_attn.k_proj.weight.requires_grad_(False)
    reference = copy.deepcopy(toy_model)
    with torch.no_grad():
        base_out = toy_model(toy_ids)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias="lora_only"))
    randomize_trainable(toy_model, seed=4)
    toy_model.layers[0].self_attn.q_proj.merge()
    with torch.no_grad():
        # Trained biases stay trained (they are part of the model); reset them to compare with the base.
        for name, p in reference.named_parameters():
            if "bias" in name:
                toy_model.get_parameter(name).copy_(p)
    remove_lora(toy_model)
    assert lora_paths(toy_model) == []
    assert all(type(m) is nn.Linear for n, m in toy_model.named_modules() if n.endswith("_proj"))
    assert set(toy_model.state_dict()) == set(reference.state_dict())
    assert trainable(toy_model) == trainable(reference)
    with torch.no_grad():
        torch.testing.assert_close(toy_model(toy_ids), base_out, rtol=1e-5, atol=1e-5)
    apply_lora(toy_model, LoraConfig(r=2, target_modules=["k_proj"]))  # can be applied again
