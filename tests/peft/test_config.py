"""LoraConfig: PEFT's defaults and validation, adapter_config.json fields, reading PEFT-written files."""

import json
import re

import pytest

from mrgfast.peft import LoraConfig

# adapter_config.json exactly as peft 0.21.2's save_pretrained wrote it for a small Qwen2 adapter.
PEFT_WRITTEN = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": ["lm_head"], "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2",
    "qalora_group_size": 16, "r": 4, "rank_pattern": {}, "revision": None, "target_modules": ["v_proj", "q_proj"],
    "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def write_config(directory, data):
    """Write `data` as adapter_config.json in `directory` and return the file path."""
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_defaults_are_peft_defaults():
    config = LoraConfig(target_modules=["q_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.0)
    assert config.bias == "none" and config.use_rslora is False and config.modules_to_save is None
    assert config.task_type == "CAUSAL_LM" and config.exclude_modules is None


def test_to_dict_has_the_fields_peft_and_vllm_need():
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                        base_model_name_or_path="meta-llama/Llama-2-7b-chat-hf")
    data = config.to_dict()
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert (data["r"], data["lora_alpha"], data["lora_dropout"]) == (64, 16, 0.05)
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert data["use_dora"] is False and data["inference_mode"] is True and data["use_rslora"] is False
    assert data["bias"] == "none" and data["modules_to_save"] is None
    assert data["base_model_name_or_path"] == "meta-llama/Llama-2-7b-chat-hf"
    json.dumps(data)  # must be plain JSON


def test_round_trip_through_dict_and_file(tmp_path):
    config = LoraConfig(r=4, lora_alpha=32, target_modules=r".*\.(q|v)_proj", exclude_modules=["lm_head"],
                        use_rslora=True, bias="lora_only", modules_to_save=["embed"])
    assert LoraConfig.from_dict(config.to_dict()) == config
    write_config(tmp_path, config.to_dict())
    assert LoraConfig.from_pretrained(tmp_path) == config
    assert LoraConfig.from_pretrained(tmp_path / "adapter_config.json") == config


def test_reads_a_peft_written_config_ignoring_other_fields(tmp_path):
    write_config(tmp_path, PEFT_WRITTEN)
    config = LoraConfig.from_pretrained(tmp_path)
    assert config.r == 4 and config.lora_alpha == 8 and config.modules_to_save == ["lm_head"]
    assert config.target_modules == ["v_proj", "q_proj"]


def test_missing_rank_and_alpha_default_to_8_like_peft():
    config = LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"]})
    assert config.r == 8 and config.lora_alpha == 8


@pytest.mark.parametrize("field, value", [("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True),
                                          ("rank_pattern", {"q_proj": 16}), ("alpha_pattern", {"q_proj": 4}),
                                          ("layers_to_transform", [0]), ("target_parameters", ["experts.w"])])
def test_rejects_fields_mrgfast_cannot_honour(tmp_path, field, value):
    path = write_config(tmp_path, {**PEFT_WRITTEN, field: value})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{field}"):
        LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_rejects_inits_that_rewrite_the_base(tmp_path, init):
    write_config(tmp_path, {**PEFT_WRITTEN, "init_lora_weights": init})
    with pytest.raises(ValueError, match="adapter_config.json.*init_lora_weights"):
        LoraConfig.from_pretrained(tmp_path)


def test_rejects_other_peft_types(tmp_path):
    write_config(tmp_path, {**PEFT_WRITTEN, "peft_type": "IA3"})
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_pretrained(tmp_path)


def test_bad_value_in_file_names_file_and_field(tmp_path):
    path = write_config(tmp_path, {**PEFT_WRITTEN, "bias": "some"})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*bias"):
        LoraConfig.from_pretrained(tmp_path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"bias": "some"}, r"bias must be one of 'none', 'all', 'lora_only'"),
    ({"r": 0}, "r must be a positive int"),
    ({"r": "8"}, "r must be a positive int"),
    ({"lora_alpha": -1}, "lora_alpha"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"target_modules": "q_proj("}, "target_modules.*regex"),
    ({"target_modules": "all-linear"}, "all-linear"),
    ({"target_modules": []}, "target_modules must not be empty"),
    ({"target_modules": [1, 2]}, "target_modules must be a list"),
    ({"exclude_modules": 3}, "exclude_modules must be a list"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    ({"task_type": "SEQ_CLS"}, "task_type must be 'CAUSAL_LM'"),
    ({"use_rslora": "yes"}, "use_rslora"),
])
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_sets_and_duplicates_are_normalised():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, modules_to_save=["lm_head", "lm_head"])
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["lm_head"]
