"""load_decoder: single-file and sharded checkpoints, tied heads, dtype/device, Qwen2-VL layouts, and errors."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mrgfast.models
from mrgfast.models import Decoder, load_decoder
from tests.models.tiny_hf import hf_logits, our_logits, random_ids


def copy_dir(src, dst):
    """A copy of a saved model directory that a test may edit."""
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_weights(hf_model, tmp_path):
    model, path = hf_model("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="150KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "the tiny model must span several shards"
    sharded, single = load_decoder(tmp_path), load_decoder(path)
    single_params = dict(single.named_parameters())
    for name, param in sharded.named_parameters():
        assert torch.equal(param, single_params[name]), name
    ids = random_ids(1, 6)
    torch.testing.assert_close(our_logits(sharded, input_ids=ids), hf_logits(model, input_ids=ids))


@pytest.mark.parametrize("name", ["tied", "qwen2_tied"])
def test_tied_head_shares_the_embedding(hf_model, name):
    model, path = hf_model(name)
    decoder = load_decoder(path)
    assert decoder.lm_head.weight is decoder.model.embed_tokens.weight
    ids = random_ids(2, 5)
    torch.testing.assert_close(our_logits(decoder, input_ids=ids), hf_logits(model, input_ids=ids),
                               rtol=1e-5, atol=3e-5)


def test_dtype_device_and_trainable_parameters(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path, dtype=torch.bfloat16, device="cpu")
    assert isinstance(decoder, Decoder) and not decoder.training
    for name, param in decoder.named_parameters():
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu" and param.requires_grad, name
    stored = load_file(path / "model.safetensors")
    assert torch.equal(decoder.model.layers[1].mlp.up_proj.weight,
                       stored["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16))


def test_qwen2_vl_skips_the_vision_tower_and_reads_both_layouts(hf_model, tmp_path):
    model, path = hf_model("qwen2_vl")
    stored = load_file(path / "model.safetensors")
    assert any(k.startswith("visual.") for k in stored) and "model.layers.0.self_attn.q_proj.weight" in stored
    decoder = load_decoder(path)
    assert not any("visual" in n for n, _ in decoder.named_parameters())
    # transformers 4.5x saved the text model as model.language_model.* and the tower as model.visual.*
    legacy = copy_dir(path, tmp_path / "legacy")
    renamed = {(k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in stored.items()}
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(1, 7)
    torch.testing.assert_close(our_logits(load_decoder(legacy), input_ids=ids), our_logits(decoder, input_ids=ids),
                               rtol=0, atol=0)


def test_unsupported_architecture_lists_the_supported_ones(hf_model, tmp_path):
    _, path = hf_model("llama")
    edited = copy_dir(path, tmp_path / "m")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(config, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported; mrgfast loads "
                                         "LlamaForCausalLM, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration"):
        load_decoder(edited)


def test_missing_and_unexpected_keys_are_named(hf_model, tmp_path):
    _, path = hf_model("llama")
    edited = copy_dir(path, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    weights.pop("model.layers.1.self_attn.k_proj.weight")
    weights["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 weight\(s\): model.layers.1.self_attn.k_proj.weight; "
                                         r"1 unexpected weight\(s\): model.layers.7.mlp.extra.weight"):
        load_decoder(edited)


def test_untied_config_without_lm_head_is_missing_it(hf_model, tmp_path):
    _, path = hf_model("tied")
    edited = copy_dir(path, tmp_path / "m")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    with pytest.raises(ValueError, match=r"missing 1 weight\(s\): lm_head.weight"):
        load_decoder(edited)


def test_shape_mismatch_names_the_key(hf_model, tmp_path):
    _, path = hf_model("llama")
    edited = copy_dir(path, tmp_path / "m")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 128\), but "
                                         r"config.json implies \(64, 96\)"):
        load_decoder(edited)


def test_missing_files_raise(hf_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_decoder(tmp_path)
    _, path = hf_model("llama")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"found \['pytorch_model.bin'\]: mrgfast loads safetensors only"):
        load_decoder(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-1.safetensors, named in model.safetensors.index.json"):
        load_decoder(tmp_path)


def test_models_package_does_not_import_transformers():
    # transformers is the test oracle for the decoder: no module of mrgfast.models imports it at module level,
    # and only the vision tower (which wraps HF encoders) imports it at all, lazily, inside a function.
    for source in Path(mrgfast.models.__file__).parent.glob("*.py"):
        tree = ast.parse(source.read_text())
        lazy = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
                for node in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n.split(".")[0] == "transformers" for n in names):
                    assert source.name == "vision.py" and id(node) in lazy, source
