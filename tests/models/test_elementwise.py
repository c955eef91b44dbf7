"""The decoder's fused_elementwise modes: `triton` (the fused ops; their Triton kernels in the interpreter here) and
`compile` (torch.compile'd regions) give `off`'s outputs and LoRA gradients, with M-RoPE and KV-cache generation."""

import pytest
import torch

from mrgfast.models import Decoder, DecoderConfig, generate
from mrgfast.peft import LoraConfig, apply_lora
from tests.ops.op_cases import use_backend

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = dict(rtol=2e-5, atol=2e-5)
# Every mode on CPU tensors: the fused ops' Triton kernels (interpreter), or inductor's generated code.
FUSED = [pytest.param("triton", marks=pytest.mark.triton), "compile"]


def use_mode(monkeypatch, mode: str) -> None:
    """Environment for `mode`: Triton's kernels forced for `triton` (CPU tensors would take the reference)."""
    if mode == "triton":
        use_backend(monkeypatch, "triton")


def lora_decoder(mode: str, mrope: bool = False) -> Decoder:
    """A tiny decoder (odd intermediate size) with LoRA (non-zero B) on every projection, the same weights each
    call, in `mode`."""
    config = DecoderConfig(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, qkv_bias=mrope,
                           mrope_section=(2, 2, 2) if mrope else None)
    torch.manual_seed(0)
    decoder = Decoder(config, fused_elementwise=mode)
    decoder.requires_grad_(False)
    apply_lora(decoder, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return decoder


def hidden_and_lora_grads(decoder: Decoder, **inputs):
    """Final hidden states and every LoRA gradient after a backward of their squares' sum."""
    hidden = decoder(**inputs)
    hidden.square().sum().backward()
    return hidden.detach(), {n: p.grad for n, p in decoder.named_parameters() if p.requires_grad}


def assert_same_run(got, want) -> None:
    """Same hidden states and LoRA gradients to fp32 tolerances."""
    torch.testing.assert_close(got[0], want[0], **FP32)
    assert got[1].keys() == want[1].keys() and len(want[1]) == 2 * len(LORA_TARGETS) * 2
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, want[1][name], **FP32, msg=name)


@pytest.mark.parametrize("mode", FUSED)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_packed_documents_match_off(monkeypatch, mode, checkpointing):
    ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(1))
    want = hidden_and_lora_grads(lora_decoder("off").train(), input_ids=ids, cu_seqlens=[0, 6, 13])
    use_mode(monkeypatch, mode)
    decoder = lora_decoder(mode).train()
    decoder.gradient_checkpointing = checkpointing
    assert_same_run(hidden_and_lora_grads(decoder, input_ids=ids, cu_seqlens=[0, 6, 13]), want)


@pytest.mark.parametrize("mode", FUSED)
def test_mrope_positions_match_off(monkeypatch, mode):
    """Qwen2-VL style: three position axes over three frequency bands, as an image's tokens give them."""
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    positions = torch.randint(0, 20, (3, 2, 9), generator=torch.Generator().manual_seed(3))
    want = hidden_and_lora_grads(lora_decoder("off", mrope=True), input_ids=ids, position_ids=positions)
    use_mode(monkeypatch, mode)
    got = hidden_and_lora_grads(lora_decoder(mode, mrope=True), input_ids=ids, position_ids=positions)
    assert_same_run(got, want)


@pytest.mark.parametrize("mode", FUSED)
def test_kv_cache_generation_matches_off(monkeypatch, mode):
    prompts = [[3, 14, 15, 9, 2], [6, 5, 35]]
    want = generate(lora_decoder("off").eval(), prompts, max_new_tokens=6, num_beams=2)
    use_mode(monkeypatch, mode)
    assert generate(lora_decoder(mode).eval(), prompts, max_new_tokens=6, num_beams=2) == want


def test_the_mode_reaches_every_region_and_is_checked():
    decoder = lora_decoder("off")
    decoder.fused_elementwise = "triton"
    layer = decoder.model.layers[1]
    modes = {m.elementwise.mode for m in (layer.input_layernorm, layer.self_attn, layer.mlp, decoder.model.norm)}
    assert modes == {"triton"} and decoder.fused_elementwise == "triton"
    with pytest.raises(ValueError, match="fused_elementwise must be one of off, triton, compile"):
        decoder.fused_elementwise = "fast"
