"""Config -> model (mrgfast.assemble.model): the settings that reach the Decoder, and model.init_from's MiniGPT-v2
starting weights."""

import pytest
import torch

from mrgfast.assemble.model import build_decoder, build_model
from mrgfast.config import parse_cli
from mrgfast.peft import adapter_state_dict
from mrgfast.training.minigptv2 import load_minigptv2
from tests.minigptv2_files import lora_key, minigptv2_state, pefomed_config, save_minigptv2


@pytest.mark.parametrize("mode", ["off", "triton", "compile"])
def test_fused_elementwise_reaches_the_decoder(mode):
    config = parse_cli(["model.hidden_size=16", "model.intermediate_size=24", f"model.fused_elementwise={mode}"])
    decoder = build_decoder(config, vocab_size=40)
    assert decoder.fused_elementwise == mode
    assert {layer.mlp.elementwise.mode for layer in decoder.model.layers} == {mode}


def test_fused_elementwise_is_off_by_default():
    assert build_decoder(parse_cli(["model.hidden_size=16"]), vocab_size=40).fused_elementwise == "off"


# model.init_from=<MiniGPT-v2 .pth or its conversion>: PeFoMed's starting projector, ln_vision and LoRA.

def minigptv2_model(tmp_path, *extra):
    """The tiny PeFoMed model built by build_model with `extra` overrides."""
    return build_model(pefomed_config(tmp_path / "cache", tmp_path / "run", *extra), vocab_size=128, views=1).model


def test_init_from_a_minigptv2_file_loads_projector_ln_vision_and_lora(tmp_path):
    state = minigptv2_state(adapter_name=True)
    path = save_minigptv2(tmp_path / "minigptv2.pth", state)
    model = minigptv2_model(tmp_path, f"model.init_from={path}")
    projector = model.adapters["image"]
    assert torch.equal(projector.proj.weight, state["llama_proj.weight"])
    assert torch.equal(projector.proj.bias, state["llama_proj.bias"])
    assert torch.equal(projector.norm.weight, torch.ones(32)) and torch.equal(projector.norm.bias, torch.zeros(32))
    assert not projector.norm.weight.requires_grad and projector.proj.weight.requires_grad
    adapter = adapter_state_dict(model.decoder)
    assert len(adapter) == 8
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            for part in "AB":
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"
                assert torch.equal(adapter[key], state[lora_key(layer, module, part, adapter_name=True)])
                assert adapter[key].requires_grad


def test_init_from_a_file_with_a_trained_ln_vision(tmp_path):
    state = minigptv2_state()
    state["ln_vision.weight"], state["ln_vision.bias"] = torch.rand(32) + 0.5, torch.rand(32)
    path = save_minigptv2(tmp_path / "ln.pth", state)
    model = minigptv2_model(tmp_path, f"model.init_from={path}", "model.train_vision=true")
    assert torch.equal(model.adapters["image"].norm.weight, state["ln_vision.weight"])
    assert torch.equal(model.adapters["image"].norm.bias, state["ln_vision.bias"])
    # Frozen, the norm would take values the run's checkpoints never save: a resume could not restore them.
    with pytest.raises(ValueError, match=r"ln\.pth sets 2 frozen weight\(s\) \(adapters\.image\.norm\.bias, "
                                         r"adapters\.image\.norm\.weight\)"):
        minigptv2_model(tmp_path, f"model.init_from={path}")


def test_init_from_minigptv2_errors_name_the_file_and_keys(tmp_path):
    path = save_minigptv2(tmp_path / "m.pth", minigptv2_state())
    with pytest.raises(ValueError, match=r"m\.pth: llama_proj\.weight has shape \(64, 128\), the model's "
                                         r"adapters\.image\.proj\.weight expects \(64, 64\)"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "model.vision_dim=16")
    with pytest.raises(ValueError, match=r"m\.pth: 4 LoRA key\(s\) the model has and the file lacks: "
                                         r"llama_model\.base_model\.model\.model\.layers\.2\.self_attn\.q_proj\.lora_A"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "model.num_hidden_layers=3")
    with pytest.raises(ValueError, match=r"m\.pth: 4 LoRA key\(s\) the model has no place for: "
                                         r"llama_model\.base_model\.model\.model\.layers\.0\.self_attn\.v_proj"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "lora.target_modules=[q_proj]")
    with pytest.raises(ValueError, match=r"m\.pth: .*lora_A\.weight has shape \(8, 64\), the model's LoRA expects "
                                         r"\(4, 64\)"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "lora.r=4")
    with pytest.raises(ValueError, match=r"m\.pth: MiniGPT-v2 trained its LoRA with lora_alpha=16"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "lora.lora_alpha=32")
    with pytest.raises(ValueError, match=r"m\.pth: holds LoRA weights but the model has no LoRA"):
        minigptv2_model(tmp_path, f"model.init_from={path}", "lora.enabled=false")
    hf = save_minigptv2(tmp_path / "hf.pth", {"model.embed_tokens.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"hf\.pth: not a MiniGPT-v2 checkpoint"):
        minigptv2_model(tmp_path, f"model.init_from={hf}")


def test_a_failed_minigptv2_load_leaves_the_model_as_built(tmp_path):
    state = minigptv2_state()
    state[lora_key(1, "v_proj", "B")] = torch.zeros(31, 8)  # the last key checked: everything before it fits
    path = save_minigptv2(tmp_path / "bad.pth", state)
    model = minigptv2_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"bad\.pth: .*layers\.1\.self_attn\.v_proj\.lora_B\.weight has shape "
                                         r"\(31, 8\)"):
        load_minigptv2(model, path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_build_model_without_init_weights_leaves_init_from_unread(tmp_path):
    config = pefomed_config(tmp_path / "c", tmp_path / "r", f"model.init_from={tmp_path / 'gone.pth'}")
    build_model(config, vocab_size=128, views=1, init_weights=False)  # a resumed run: nothing to read
    with pytest.raises(ValueError, match="gone.pth"):
        build_model(config, vocab_size=128, views=1)
