"""Reading MiniGPT-v2 checkpoints (mrgfast.training.minigptv2): key layouts, values, ln_vision, and every error."""

import collections

import pytest
import torch

from mrgfast.training.minigptv2 import LN_VISION_EPS, MODULE_NAMES, ROPE_BUFFER, read_minigptv2
from tests.minigptv2_files import GROUP, HIDDEN, RANK, VISION, lora_key, minigptv2_state, save_minigptv2


def peft_key(layer, module, part):
    """The key PEFT's adapter file uses for a LoRA weight."""
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"


@pytest.mark.parametrize("adapter_name", [False, True], ids=["peft-0.2", "peft-0.3+"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["model-dict", "raw"])
def test_reads_projector_and_lora_with_their_values(tmp_path, adapter_name, wrapped):
    state = minigptv2_state(adapter_name=adapter_name)
    weights = read_minigptv2(save_minigptv2(tmp_path / "ckpt.pth", state, wrapped=wrapped))
    assert torch.equal(weights.projector["weight"], state["llama_proj.weight"])
    assert torch.equal(weights.projector["bias"], state["llama_proj.bias"])
    assert len(weights.adapter) == 8
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            for part in "AB":
                source = lora_key(layer, module, part, adapter_name)
                assert torch.equal(weights.adapter[peft_key(layer, module, part)], state[source])
                assert weights.source_keys[peft_key(layer, module, part)] == source
    assert weights.lora_r == RANK and weights.lora_alpha == 16 and weights.target_modules == ["q_proj", "v_proj"]
    assert weights.skipped == sorted(k for k in state if ROPE_BUFFER.match(k)) and len(weights.skipped) == 2


def test_lora_settings_come_from_the_saved_config_else_minigptv2_defaults(tmp_path):
    state = minigptv2_state()
    assert read_minigptv2(save_minigptv2(tmp_path / "a.pth", state, lora_alpha=32)).lora_alpha == 32
    assert read_minigptv2(save_minigptv2(tmp_path / "b.pth", state, wrapped=False)).lora_alpha == 16
    with pytest.raises(ValueError, match=r"c\.pth: its config says lora_r=64, but its LoRA weights have rank 8"):
        read_minigptv2(save_minigptv2(tmp_path / "c.pth", state, lora_r=64))


def test_ln_vision_is_layernorms_initial_values_unless_the_file_has_it(tmp_path):
    weights = read_minigptv2(save_minigptv2(tmp_path / "a.pth", minigptv2_state()))
    modules = weights.module_tensors(GROUP)
    assert sorted(modules) == sorted(MODULE_NAMES)
    assert torch.equal(modules["adapters.image.norm.weight"], torch.ones(VISION))
    assert torch.equal(modules["adapters.image.norm.bias"], torch.zeros(VISION))
    assert modules["adapters.image.proj.weight"] is weights.projector["weight"]
    state = minigptv2_state()
    state["ln_vision.weight"], state["ln_vision.bias"] = torch.rand(VISION) + 0.5, torch.rand(VISION)
    modules = read_minigptv2(save_minigptv2(tmp_path / "b.pth", state)).module_tensors(GROUP)
    assert torch.equal(modules["adapters.image.norm.weight"], state["ln_vision.weight"])
    assert torch.equal(modules["adapters.image.norm.bias"], state["ln_vision.bias"])
    del state["ln_vision.bias"]
    with pytest.raises(ValueError, match=r"c\.pth: 1 key\(s\) missing: ln_vision\.bias"):
        read_minigptv2(save_minigptv2(tmp_path / "c.pth", state))


def test_missing_keys_are_named_with_a_count(tmp_path):
    state = minigptv2_state()
    del state["llama_proj.bias"], state[lora_key(1, "v_proj", "B")], state[lora_key(0, "q_proj", "A")]
    with pytest.raises(ValueError) as err:
        read_minigptv2(save_minigptv2(tmp_path / "m.pth", state))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'm.pth'}: 3 key(s) missing: ")
    for key in ("llama_proj.bias", lora_key(1, "v_proj", "B"), lora_key(0, "q_proj", "A")):
        assert key in message


def test_unexpected_keys_are_named_with_a_count(tmp_path):
    state = minigptv2_state()
    extra = [f"visual_encoder.blocks.{i}.norm1.weight" for i in range(7)]
    state.update({k: torch.zeros(2) for k in extra})
    with pytest.raises(ValueError) as err:
        read_minigptv2(save_minigptv2(tmp_path / "u.pth", state))
    message = str(err.value)
    assert "u.pth: 7 key(s) neither the projector nor LoRA: visual_encoder.blocks.0.norm1.weight" in message
    assert "(7 in all)" in message


def test_the_same_lora_weight_under_both_peft_names_is_an_error(tmp_path):
    state = minigptv2_state()
    state[lora_key(0, "q_proj", "A", adapter_name=True)] = state[lora_key(0, "q_proj", "A")]
    with pytest.raises(ValueError, match="are the same LoRA weight"):
        read_minigptv2(save_minigptv2(tmp_path / "d.pth", state))


def test_mixed_ranks_and_bad_projector_shapes_are_errors(tmp_path):
    state = minigptv2_state()
    state[lora_key(1, "v_proj", "A")] = torch.zeros(4, HIDDEN)
    with pytest.raises(ValueError, match=r"LoRA ranks differ"):
        read_minigptv2(save_minigptv2(tmp_path / "r.pth", state, wrapped=False))
    state = minigptv2_state()
    state["llama_proj.bias"] = torch.zeros(HIDDEN + 1)
    with pytest.raises(ValueError, match=r"llama_proj\.weight / llama_proj\.bias have shapes \(64, 128\) / \(65,\)"):
        read_minigptv2(save_minigptv2(tmp_path / "p.pth", state))


def test_a_file_that_is_not_minigptv2s_is_refused(tmp_path):
    hf = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"h\.pth: not a MiniGPT-v2 checkpoint .*its keys: lm_head\.weight, "
                                         r"model\.layers\.0\.self_attn\.q_proj\.weight \(2 in all\)"):
        read_minigptv2(save_minigptv2(tmp_path / "h.pth", hf, wrapped=False))
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: expected a state dict or \{'model': state dict\}, found a list"):
        read_minigptv2(tmp_path / "list.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth: not a loadable torch checkpoint"):
        read_minigptv2(tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError, match=r"absent\.pth: no such file"):
        read_minigptv2(tmp_path / "absent.pth")


def test_pickled_objects_are_refused_weights_only(tmp_path):
    # An OrderedDict subclass is not on weights_only's allow-list: unpickling it would run its module's code.
    torch.save({"model": Custom(minigptv2_state())}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"code\.pth: .*holds more than tensors"):
        read_minigptv2(tmp_path / "code.pth")


class Custom(collections.OrderedDict):
    """A dict subclass that torch.load(weights_only=True) must refuse."""


def test_eps_of_ln_vision_is_layernorms_default():
    assert LN_VISION_EPS == torch.nn.LayerNorm(4).eps
