"""RoPE frequencies and cos/sin tables against transformers' own rotary embeddings."""

import pytest
import torch

from mrgfast.models import DecoderConfig
from mrgfast.models.rope import RotaryEmbedding, apply_rope, inv_frequencies

import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding  # noqa: E402

SIZES = dict(hidden_size=96, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4, vocab_size=8)
SCALINGS = {
    "default": None,
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
}


def configs(kind):
    """(HF LlamaConfig, DecoderConfig) with the same RoPE, head_dim 24, max_position_embeddings 16."""
    scaling = SCALINGS[kind]
    hf = transformers.LlamaConfig(**SIZES, max_position_embeddings=16, rope_theta=5000.0,
                                  **({"rope_scaling": dict(scaling)} if scaling else {}))
    ours = DecoderConfig(**SIZES, max_position_embeddings=16, rope_theta=5000.0, rope_scaling=scaling)
    return hf, ours


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("seq", [10, 40])
def test_cos_sin_match_llama_rotary_embedding(kind, seq):
    hf_config, config = configs(kind)
    positions = torch.arange(seq)[None]
    # A fresh HF module per call: its dynamic scaling keeps state between calls.
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    ours_cos, ours_sin = RotaryEmbedding(config)(positions[0])
    torch.testing.assert_close(ours_cos, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_sin, sin[0], rtol=0, atol=1e-6)


def test_scalings_change_the_frequencies():
    base = inv_frequencies(configs("default")[1])
    for kind in ("linear", "llama3"):
        assert not torch.allclose(inv_frequencies(configs(kind)[1]), base)
    dynamic = configs("dynamic")[1]
    assert torch.equal(inv_frequencies(dynamic, seq_len=16), base)  # within max_position_embeddings: unchanged
    assert not torch.allclose(inv_frequencies(dynamic, seq_len=40), base)


def test_mrope_matches_qwen2_vl_rotary_embedding():
    hf_config = transformers.Qwen2VLTextConfig(**SIZES, rope_scaling={"type": "mrope", "mrope_section": [3, 4, 5]})
    config = DecoderConfig(**SIZES, rope_theta=1000000.0, mrope_section=(3, 4, 5))
    positions = torch.randint(0, 30, (3, 1, 17), generator=torch.Generator().manual_seed(0))
    cos, sin = Qwen2VLRotaryEmbedding(hf_config)(torch.zeros(1), positions)
    ours_cos, ours_sin = RotaryEmbedding(config)(positions[:, 0])
    torch.testing.assert_close(ours_cos, cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_sin, sin[0], rtol=0, atol=1e-6)
    # 1-D positions mean the same position on all three axes.
    text = positions[0, 0]
    torch.testing.assert_close(RotaryEmbedding(config)(text)[0], RotaryEmbedding(config)(text.expand(3, -1))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_transformers(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 24, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(configs("llama3")[1])(torch.arange(7))
    # HF rotates [batch, heads, seq, dim] with tables cast to the input dtype.
    theirs, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None].to(dtype),
                                     sin[None].to(dtype))
    torch.testing.assert_close(apply_rope(x, cos, sin), theirs[0].transpose(0, 1), rtol=0, atol=0)
