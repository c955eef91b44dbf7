"""`python -m mrgfast.convert minigptv2 SRC OUT`: the files it writes hold the source's tensors, PEFT loads the adapter
onto transformers' Llama with the outputs of mrgfast's model.init_from, and its command line parses and fails as the
project's others do."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from mrgfast.assemble.model import build_model
from mrgfast.convert.__main__ import main
from mrgfast.convert.minigptv2 import convert_minigptv2
from mrgfast.peft import adapter_state_dict
from mrgfast.training.checkpoint import read_checkpoint
from tests.minigptv2_files import RANK, VISION, lora_key, minigptv2_state, pefomed_config, save_minigptv2
from tests.models.tiny_hf import our_logits


@pytest.fixture
def source(tmp_path):
    """(path, state) of a synthetic MiniGPT-v2 stage-3 checkpoint in fp16, as its LLM side trains."""
    state = minigptv2_state(dtype=torch.float16)
    return save_minigptv2(tmp_path / "minigptv2_checkpoint.pth", state), state


def test_converted_files_hold_the_source_tensors(source, tmp_path):
    path, state = source
    convert_minigptv2(path, tmp_path / "out", base_model_name_or_path="/ckpt/Llama-2-7b-chat-hf")
    ckpt = read_checkpoint(tmp_path / "out")  # every file verifies against the manifest
    assert ckpt.step == 0 and ckpt.optimizer is None and ckpt.extra["converted_from"] == "minigptv2"
    modules = ckpt.tensors["modules"]
    assert sorted(modules) == ["adapters.image.norm.bias", "adapters.image.norm.weight",
                               "adapters.image.proj.bias", "adapters.image.proj.weight"]
    assert torch.equal(modules["adapters.image.proj.weight"], state["llama_proj.weight"])
    assert modules["adapters.image.proj.weight"].dtype == torch.float16  # as saved, not cast
    assert torch.equal(modules["adapters.image.proj.bias"], state["llama_proj.bias"])
    assert torch.equal(modules["adapters.image.norm.weight"], torch.ones(VISION, dtype=torch.float16))
    assert torch.equal(modules["adapters.image.norm.bias"], torch.zeros(VISION, dtype=torch.float16))
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 8
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            for part in "AB":
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}.weight"
                assert torch.equal(adapter[key], state[lora_key(layer, module, part)])
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.05
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "/ckpt/Llama-2-7b-chat-hf"


def test_peft_loads_the_adapter_and_matches_mrgfast_init_from(source, tmp_path, fresh_hf, hf_ids):
    import peft
    path, _ = source
    convert_minigptv2(path, tmp_path / "out")
    hf_dir = tmp_path / "llama"
    fresh_hf("llama").save_pretrained(hf_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(fresh_hf("llama"), str(tmp_path / "out" / "adapter")).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        theirs = peft_model(input_ids=hf_ids).logits.float()
        base = fresh_hf("llama")(input_ids=hf_ids).logits.float()
    assert not torch.allclose(theirs, base, atol=1e-3), "the adapter must change the output"
    for init in (path, tmp_path / "out"):  # the .pth itself and its conversion
        config = pefomed_config(tmp_path / "cache", tmp_path / "run", f"model.name_or_path={hf_dir}",
                                f"model.init_from={init}")
        model = build_model(config, vocab_size=128, views=1).model.eval()
        torch.testing.assert_close(our_logits(model.decoder, input_ids=hf_ids), theirs, rtol=1e-5, atol=1e-5)


def test_init_from_the_conversion_equals_init_from_the_file(source, tmp_path):
    path, _ = source
    convert_minigptv2(path, tmp_path / "out")
    models = []
    for init in (path, tmp_path / "out"):
        torch.manual_seed(0)  # the same random decoder and ViT under both
        config = pefomed_config(tmp_path / "c", tmp_path / "r", f"model.init_from={init}")
        models.append(build_model(config, vocab_size=128, views=1).model)
    mine, theirs = (dict(m.named_parameters()) for m in models)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert sorted(adapter_state_dict(models[1].decoder)) == sorted(adapter_state_dict(models[0].decoder))


def test_command_line_writes_and_reports(source, tmp_path, capsys):
    path, _ = source
    assert main(["minigptv2", str(path), str(tmp_path / "a")]) == 0
    said = capsys.readouterr().err
    assert f"wrote {tmp_path / 'a'}: llama_proj [64, 128]" in said and "LoRA r=8 alpha=16 on q_proj, v_proj" in said
    assert "skipped 2 RoPE inv_freq buffers" in said
    assert main(["minigptv2", f"src={path}", f"out={tmp_path / 'b'}", "group=4"]) == 0
    assert (tmp_path / "b" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("argv, message", [
    ([], "expected a format first, one of ['minigptv2'] (got none)"),
    (["minigpt4", "a", "b"], "expected a format first, one of ['minigptv2'] (got 'minigpt4')"),
    (["minigptv2", "SRC"], "out= required"),
    (["minigptv2", "SRC", "OUT", "THIRD"], "argument 'THIRD': expected SRC OUT and key=value options"),
    (["minigptv2", "SRC", "OUT", "grup=4"], "argument 'grup=4': expected <key>=value with key one of"),
    (["minigptv2", "SRC", "OUT", "group=0"], "group must be >= 1, got 0"),
    (["minigptv2", "SRC", "EXISTS"], "EXISTS: exists; give a new directory"),
    (["minigptv2", "NOT_MINIGPT", "OUT"], "not_minigpt.pth: not a MiniGPT-v2 checkpoint"),
    (["minigptv2", "ABSENT", "OUT"], "absent.pth: no such file"),
])
def test_command_line_errors_are_one_line_and_exit_2(source, tmp_path, capsys, argv, message):
    path, _ = source
    (tmp_path / "exists").mkdir()
    other = save_minigptv2(tmp_path / "not_minigpt.pth", {"lm_head.weight": torch.zeros(2, 2)}, wrapped=False)
    names = {"SRC": str(path), "OUT": str(tmp_path / "out"), "EXISTS": str(tmp_path / "exists"),
             "NOT_MINIGPT": str(other), "ABSENT": str(tmp_path / "absent.pth")}
    assert main([names.get(a, a) for a in argv]) == 2
    said = capsys.readouterr().err
    assert said.startswith("mrgfast.convert: ") and said.count("\n") == 1
    assert message.replace("EXISTS", str(tmp_path / "exists")) in said
    assert not (tmp_path / "out").exists()
