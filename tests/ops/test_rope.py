"""rope on every backend against the fp32 reference (RoPE and M-RoPE tables): output and gradient."""

import pytest
import torch

from mrgfast.models.config import DecoderConfig
from mrgfast.models.rope import RotaryEmbedding
from mrgfast.ops.rope import reference_rope, rope
from tests.ops.elementwise_cases import BACKENDS, DTYPES, TOKENS, check_against_oracle, random
from tests.ops.op_cases import use_backend


def tables(tokens: int, head_dim: int, mrope: bool, seed: int):
    """cos, sin [tokens, head_dim] from the decoder's RotaryEmbedding: text positions, or 3-axis M-RoPE ones."""
    half = head_dim // 2
    section = (half - 2 * (half // 3), half // 3, half // 3) if mrope else None
    config = DecoderConfig(vocab_size=8, hidden_size=head_dim * 2, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, mrope_section=section)
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 500, (3, tokens) if mrope else (tokens,), generator=g)
    return RotaryEmbedding(config)(positions)


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("tokens", TOKENS)
# (heads, head_dim, M-RoPE): 17 heads take two head blocks; M-RoPE needs head_dim >= 6 for its three bands.
@pytest.mark.parametrize("heads,head_dim,mrope", [(1, 2, False), (3, 10, False), (3, 10, True), (5, 64, False),
                                                  (5, 64, True), (17, 6, True)])
def test_matches_reference(monkeypatch, backend, dtype, tokens, heads, head_dim, mrope):
    use_backend(monkeypatch, backend)
    cos, sin = tables(tokens, head_dim, mrope, seed=tokens)
    g = torch.Generator().manual_seed(heads)
    check_against_oracle(rope, reference_rope, dict(x=random(g, tokens, heads, head_dim, dtype=dtype), cos=cos,
                                                    sin=sin), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_view_as_the_fused_qkv_gives_it(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    g = torch.Generator().manual_seed(0)
    qkv = random(g, 11, 3 * 4 * 8)
    q = qkv[:, : 4 * 8].view(11, 4, 8)  # rows strided by the whole q/k/v width
    cos, sin = tables(11, 8, False, seed=1)
    check_against_oracle(rope, reference_rope, dict(x=q, cos=cos, sin=sin), torch.float32)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="even head_dim"):
        rope(torch.zeros(2, 1, 5), torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="cos and sin must be"):
        rope(torch.zeros(2, 1, 4), torch.zeros(3, 4), torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,heads,head_dim,mrope", [(1, 1, 2, False), (4099, 32, 64, False), (513, 28, 128, True),
                                                          (77, 17, 80, False)])
def test_matches_reference_on_gpu(monkeypatch, dtype, tokens, heads, head_dim, mrope):
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    cos, sin = (t.cuda() for t in tables(tokens, head_dim, mrope, seed=0))
    x = random(torch.Generator().manual_seed(0), tokens, heads, head_dim, dtype=dtype).detach().cuda().requires_grad_()
    check_against_oracle(rope, reference_rope, dict(x=x, cos=cos, sin=sin), dtype)
