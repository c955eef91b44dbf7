"""DecoderConfig.from_hf: config.json layouts of transformers 5 and older saves, and clear errors."""

import json

import pytest

from mrgfast.models import DecoderConfig
from tests.models.tiny_hf import BUILDERS

LLAMA2 = {  # Llama-2's config.json as published (no rope_theta, rope_scaling null)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 4096,
}
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
QWEN2_VL_LEGACY = {  # Qwen2-VL-2B-Instruct's flat config.json as saved before transformers 5
    "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
    "max_position_embeddings": 32768, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280},
}


def test_llama2_legacy_config():
    config = DecoderConfig.from_hf(LLAMA2)
    assert (config.head_dim, config.num_key_value_heads, config.rope_theta) == (128, 32, 10000.0)
    assert config.rope_scaling is None and config.mrope_section is None and not config.qkv_bias
    assert config.rms_norm_eps == 1e-05


def test_llama31_legacy_rope_scaling_and_old_type_key():
    config = DecoderConfig.from_hf(dict(LLAMA2, rope_theta=500000.0, rope_scaling=LLAMA31_SCALING))
    assert config.rope_theta == 500000.0 and config.rope_scaling == LLAMA31_SCALING
    config = DecoderConfig.from_hf(dict(LLAMA2, rope_scaling={"type": "linear", "factor": 2.0}))
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_qwen2_vl_legacy_flat_config():
    config = DecoderConfig.from_hf(QWEN2_VL_LEGACY)
    assert config.mrope_section == (16, 24, 24) and config.rope_scaling is None
    assert config.tie_word_embeddings and config.qkv_bias and not config.o_bias
    assert (config.hidden_size, config.head_dim, config.num_key_value_heads) == (1536, 128, 2)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fields_match_transformers_configs(hf_model, name):
    model, path = hf_model(name)
    hf, text = model.config, model.config.get_text_config()
    config = DecoderConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert config.head_dim == getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert config.num_key_value_heads == text.num_key_value_heads
    assert config.rms_norm_eps == text.rms_norm_eps
    assert config.rope_theta == text.rope_parameters["rope_theta"]
    assert config.tie_word_embeddings == hf.tie_word_embeddings


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["MistralForCausalLM"]), "not supported; mrgfast loads LlamaForCausalLM, Qwen2ForCausalLM, "
                                                 "Qwen2VLForConditionalGeneration"),
    (dict(architectures=None), "architectures=None is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs a number 'low_freq_factor'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    (dict(num_key_value_heads=5), r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"),
    (dict(hidden_size=None), "hidden_size must be a positive int"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}), "M-RoPE .* only supported for Qwen2VL"),
])
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_hf(dict(LLAMA2, **change))


def test_missing_fields_and_bad_mrope_section():
    with pytest.raises(ValueError, match=r"missing field\(s\) \['intermediate_size'\]"):
        DecoderConfig.from_hf({k: v for k, v in LLAMA2.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="mrope_section must be 3 ints summing to head_dim/2 = 64"):
        DecoderConfig.from_hf(dict(QWEN2_VL_LEGACY, rope_scaling={"type": "mrope", "mrope_section": [16, 24]}))


def test_hf_llama_config_reads_back_as_the_same_decoder_config_and_builds_transformers_llama():
    """The written config.json is read back to the same DecoderConfig, and transformers builds its Llama from it."""
    import types

    import transformers

    from mrgfast.models.config import hf_llama_config

    config = DecoderConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5000.0,
                           max_position_embeddings=64)
    tokenizer = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    written = hf_llama_config(config, tokenizer)
    assert DecoderConfig.from_hf(written) == config
    llama = transformers.LlamaConfig(**{k: v for k, v in written.items() if k != "architectures"})
    assert (llama.num_key_value_heads, llama.head_dim, llama.eos_token_id) == (2, 6, 2)
