"""Decoder against transformers: logits and gradients, packed rows, Qwen2-VL M-RoPE with image tokens, LoRA."""

import copy

import pytest
import torch

from mrgfast.layers import LoRALinear
from mrgfast.models import Decoder, DecoderConfig, load_decoder
from mrgfast.layout import OutputRows, Segments
from mrgfast.peft import LoraConfig, apply_lora, save_adapter
from tests.models.tiny_hf import TEXT_MODELS, hf_logits, our_logits, random_ids, vl_embeds_and_positions, vl_inputs

FP32 = dict(rtol=1e-5, atol=3e-5)


def assert_grads_close(ours: torch.Tensor, theirs: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """Gradients agree to `rel` of their largest entry (sums over many tokens round differently in fp32)."""
    error, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert error <= rel * scale + 1e-7, f"{name}: max error {error:.3g} vs largest gradient {scale:.3g}"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", TEXT_MODELS)
@pytest.mark.parametrize("seq", [6, 11])
def test_logits_match_transformers(hf_model, name, seq):
    # seq 11 > max_position_embeddings 8 of the "dynamic" model, so its NTK scaling takes effect.
    model, path = hf_model(name)
    ids = random_ids(2, seq, seed=seq)
    torch.testing.assert_close(our_logits(load_decoder(path), input_ids=ids), hf_logits(model, input_ids=ids), **FP32)


@pytest.mark.parametrize("name", ["llama_bias", "qwen2", "tied"])
def test_gradients_match_transformers(hf_model, name):
    model, path = hf_model(name)
    theirs, ours = copy.deepcopy(model).train(), load_decoder(path).train()
    ids = random_ids(2, 7, seed=3)
    weights = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(4))
    (theirs(input_ids=ids).logits * weights).sum().backward()
    (ours.compute_logits(ours(input_ids=ids)) * weights).sum().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters()}
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert our_grads.keys() == their_grads.keys()
    for n, grad in our_grads.items():
        assert_grads_close(grad, their_grads[n], n)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_bf16_matches_transformers_in_bf16(hf_model, name):
    model, path = hf_model(name)
    ids = random_ids(2, 9, seed=5)
    ours = our_logits(load_decoder(path, dtype=torch.bfloat16), input_ids=ids)
    theirs = hf_logits(copy.deepcopy(model).to(torch.bfloat16), input_ids=ids)
    exact = hf_logits(model, input_ids=ids)
    # Both round the same way in bf16: ours must be as close to transformers' bf16 as bf16 is to fp32.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.05 * exact.abs().max().item())
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


def split_by(stream: torch.Tensor, bounds: list) -> list:
    """Documents [1, n, ...] cut out of a flattened [T, ...] stream at `bounds`."""
    return [stream[a:b][None] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama3"])
def test_packed_rows_match_separate_sequences(hf_model, name):
    model, path = hf_model(name)
    decoder = load_decoder(path)
    ids = random_ids(2, 8, seed=6)
    bounds = [0, 5, 6, 8, 13, 16]  # a 1-token document, and documents ending exactly at a row end
    packed = our_logits(decoder, input_ids=ids, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    for doc, out in zip(split_by(ids.flatten(), bounds), split_by(packed.reshape(16, -1), bounds)):
        torch.testing.assert_close(out, hf_logits(model, input_ids=doc), **FP32)
        torch.testing.assert_close(out, our_logits(decoder, input_ids=doc), **FP32)


def test_packed_gradients_match_separate_sequences(hf_model):
    _, path = hf_model("qwen2")
    packed_model, separate_model = load_decoder(path).train(), load_decoder(path).train()
    ids = random_ids(1, 12, seed=7)
    bounds = [0, 4, 5, 12]
    weights = torch.randn(12, 128, generator=torch.Generator().manual_seed(8))
    packed = packed_model.compute_logits(packed_model(input_ids=ids, cu_seqlens=bounds))
    (packed[0] * weights).sum().backward()
    for doc, w in zip(split_by(ids.flatten(), bounds), split_by(weights, bounds)):
        (separate_model.compute_logits(separate_model(input_ids=doc)) * w).sum().backward()
    for (n, p), q in zip(packed_model.named_parameters(), separate_model.parameters()):
        assert_grads_close(p.grad, q.grad, n)


def test_explicit_positions_and_inputs_embeds_match_defaults(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path)
    ids = random_ids(1, 9, seed=9)
    bounds = [0, 4, 9]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    default = our_logits(decoder, input_ids=ids, cu_seqlens=bounds)
    explicit = our_logits(decoder, inputs_embeds=decoder.embed(ids), position_ids=positions, cu_seqlens=bounds)
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)


def test_qwen2_vl_mrope_with_image_tokens_matches_transformers(hf_model):
    model, path = hf_model("qwen2_vl")
    decoder = load_decoder(path)
    inputs = vl_inputs(prefix=3, suffix=5, grid=(1, 4, 6))
    embeds, positions = vl_embeds_and_positions(model, inputs)
    assert not torch.equal(positions[0], positions[1]), "the image must give distinct height/width positions"
    torch.testing.assert_close(our_logits(decoder, inputs_embeds=embeds, position_ids=positions),
                               hf_logits(model, **inputs), **FP32)
    text = random_ids(2, 7, seed=10)  # text only: 1-D positions stand for all three axes
    torch.testing.assert_close(our_logits(decoder, input_ids=text), hf_logits(model, input_ids=text), **FP32)


def test_qwen2_vl_packed_multimodal_documents_match_separate(hf_model):
    model, path = hf_model("qwen2_vl")
    decoder = load_decoder(path)
    docs = [vl_inputs(prefix=2, suffix=3, grid=(1, 4, 4), seed=11), vl_inputs(prefix=4, suffix=1, grid=(1, 6, 4),
                                                                                seed=12)]
    embeds, positions = zip(*(vl_embeds_and_positions(model, d) for d in docs))
    lengths = [e.shape[1] for e in embeds]
    packed = our_logits(decoder, inputs_embeds=torch.cat(embeds, 1), position_ids=torch.cat(positions, -1),
                        cu_seqlens=[0, lengths[0], sum(lengths)])
    for doc, out in zip(docs, packed.split(lengths, dim=1)):
        torch.testing.assert_close(out, hf_logits(model, **doc), **FP32)


def test_apply_lora_targets_hf_names_and_peft_loads_the_adapter(hf_model, tmp_path):
    import peft
    model, path = hf_model("qwen2")
    decoder = apply_lora(load_decoder(path), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    wrapped = sorted(n for n, m in decoder.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(f"model.layers.{i}.{block}.{t}" for i in range(2) for t in LORA_TARGETS
                             for block in ["self_attn" if t in LORA_TARGETS[:4] else "mlp"])
    with torch.no_grad():
        for n, p in decoder.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    save_adapter(decoder, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    ids = random_ids(2, 6, seed=13)
    ours = our_logits(decoder, input_ids=ids)
    assert not torch.allclose(ours, hf_logits(model, input_ids=ids), atol=1e-2), "the adapter must change the output"
    torch.testing.assert_close(ours, hf_logits(theirs, input_ids=ids), **FP32)


def test_gradient_checkpointing_gives_the_same_gradients(hf_model):
    _, path = hf_model("llama")
    plain, checkpointed = load_decoder(path).train(), load_decoder(path).train()
    checkpointed.gradient_checkpointing = True
    ids = random_ids(1, 10, seed=14)
    for decoder in (plain, checkpointed):
        decoder.compute_logits(decoder(input_ids=ids, cu_seqlens=[0, 3, 10])).square().mean().backward()
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name, checkpointing", [("qwen2", False), ("llama", True), ("qwen2_vl", False)])
def test_output_rows_equal_the_same_rows_of_the_full_stream(hf_model, name, checkpointing):
    _, path = hf_model(name)
    full_model, rows_model = load_decoder(path).train(), load_decoder(path).train()
    rows_model.gradient_checkpointing = checkpointing
    ids = random_ids(1, 16, seed=15)
    bounds = [0, 5, 6, 12, 16]
    seg = Segments.from_lengths([5, 1, 6, 4], "cpu")
    # A suffix from inside the document, an empty one, a whole document, the last token alone.
    rows = OutputRows.suffixes(seg, [2, 6, 6, 15], "cpu")
    assert rows.index.tolist() == [2, 3, 4, 6, 7, 8, 9, 10, 11, 15] and rows.seg.lengths == [3, 0, 6, 1]
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    if name == "qwen2_vl":  # distinct M-RoPE axes, so the rows must take their own cos/sin
        positions = torch.stack([positions, positions * 2, positions + 1])
    weights = torch.randn(10, 128, generator=torch.Generator().manual_seed(16))
    full = full_model(input_ids=ids, position_ids=positions, cu_seqlens=bounds)[0].index_select(0, rows.index)
    kept = rows_model(input_ids=ids, position_ids=positions, cu_seqlens=bounds, output_rows=rows)
    assert kept.shape == (10, full.shape[-1])
    torch.testing.assert_close(kept, full, **FP32)
    (full_model.compute_logits(full) * weights).sum().backward()
    (rows_model.compute_logits(kept) * weights).sum().backward()
    for (n, p), q in zip(full_model.named_parameters(), rows_model.parameters()):
        assert_grads_close(q.grad, p.grad, n)
    with pytest.raises(ValueError, match="each start must lie inside its document"):
        OutputRows.suffixes(seg, [2, 7, 6, 15], "cpu")
    with pytest.raises(ValueError, match="output_rows has 2 documents, the layout 4"):
        rows_model(input_ids=ids, cu_seqlens=bounds, output_rows=OutputRows.suffixes(
            Segments.from_lengths([6, 10], "cpu"), [0, 6], "cpu"))


def test_bad_inputs_raise_clear_errors(hf_model):
    _, path = hf_model("llama")
    decoder = load_decoder(path)
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        decoder(input_ids=ids, inputs_embeds=decoder.embed(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        decoder()
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        decoder(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 64\]"):
        decoder(inputs_embeds=torch.zeros(1, 5, 32))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the number of tokens"):
        decoder(input_ids=ids, cu_seqlens=[0, 3, 4])
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        decoder(input_ids=ids, cu_seqlens=[0, 4, 2, 5])
    with pytest.raises(ValueError, match=r"position_ids must be \[1, 5\] or \[3, 1, 5\]"):
        decoder(input_ids=ids, position_ids=torch.arange(5))
    with pytest.raises(ValueError, match="need an M-RoPE model"):
        decoder(input_ids=ids, position_ids=torch.zeros(3, 1, 5, dtype=torch.long))


def cpu_and_cuda_bf16(hf_model) -> tuple:
    """The tiny Qwen2 loaded twice: fp32 on the CPU (the reference) and bf16 on CUDA."""
    _, path = hf_model("qwen2")
    return load_decoder(path), load_decoder(path, dtype=torch.bfloat16, device="cuda")


def assert_bf16_close(fast: torch.Tensor, exact: torch.Tensor) -> None:
    """bf16 CUDA output within 5% of the fp32 reference's largest magnitude."""
    torch.testing.assert_close(fast.float().cpu(), exact, rtol=0, atol=0.05 * exact.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_packed_forward_matches_cpu(hf_model):
    cpu, gpu = cpu_and_cuda_bf16(hf_model)
    ids = random_ids(1, 12, seed=15)
    bounds = [0, 5, 12]
    exact = our_logits(cpu, input_ids=ids, cu_seqlens=bounds)
    fast = our_logits(gpu, input_ids=ids.cuda(), cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device="cuda"))
    assert_bf16_close(fast, exact)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_output_rows_match_cpu_full_stream(hf_model):
    """The fused varlen kernels with suffix queries, an empty one included (a document without supervision)."""
    cpu, gpu = cpu_and_cuda_bf16(hf_model)
    ids = random_ids(1, 16, seed=17)
    bounds = [0, 5, 6, 12, 16]
    rows = OutputRows.suffixes(Segments.from_lengths([5, 1, 6, 4], "cpu"), [2, 6, 6, 15], "cuda")
    exact = cpu(input_ids=ids, cu_seqlens=bounds)[0].index_select(0, rows.index.cpu())
    fast = gpu(input_ids=ids.cuda(), cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device="cuda"),
               output_rows=rows)
    assert_bf16_close(fast, exact)


def lora_decoder_pair(targets, dropout: float = 0.0):
    """Two identical tiny decoders with LoRA (non-zero B) on `targets`, the second with q/k/v fusion turned off."""
    config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)
    decoders = []
    for fuse in (True, False):
        torch.manual_seed(0)
        decoder = Decoder(config)
        decoder.requires_grad_(False)
        apply_lora(decoder, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
        with torch.no_grad():
            for name, param in decoder.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        for layer in decoder.model.layers:
            layer.self_attn.fuse_qkv = fuse
        decoders.append(decoder)
    return decoders


def test_qkv_lora_runs_through_the_fused_op_with_the_same_outputs_and_gradients():
    fused, separate = lora_decoder_pair(["q_proj", "k_proj", "v_proj", "o_proj"])
    ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(1))
    outputs = []
    for decoder in (fused, separate):
        hidden = decoder(input_ids=ids, cu_seqlens=[0, 6, 13])
        hidden.square().sum().backward()
        outputs.append((hidden, {n: p.grad for n, p in decoder.named_parameters() if p.requires_grad}))
    assert all(layer.self_attn.fused_qkv() is not None for layer in fused.model.layers)
    assert all(layer.self_attn.fused_qkv() is None for layer in separate.model.layers)
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    assert outputs[0][1].keys() == outputs[1][1].keys() and len(outputs[0][1]) == 2 * 4 * 2
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][name], rtol=1e-5, atol=1e-5, msg=name)
    # The fused op keeps the projections' own parameters and names: the state dicts are the same.
    assert fused.state_dict().keys() == separate.state_dict().keys()


def test_qkv_fusion_needs_lora_on_all_three():
    fused, _ = lora_decoder_pair(["q_proj", "v_proj"])
    assert all(layer.self_attn.fused_qkv() is None for layer in fused.model.layers)


def test_a_decoder_made_on_its_device_has_decoder_init_without_a_cpu_copy():
    from mrgfast.models import decoder_on_device
    config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(3)
    expected = Decoder(config)
    torch.manual_seed(3)
    made = decoder_on_device(config, "cpu")  # the CPU twin of the accelerator path: same construction order
    assert made.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in made.state_dict().items():
        torch.testing.assert_close(tensor, expected.state_dict()[name], rtol=0, atol=0, msg=name)
    assert made.lm_head.weight is made.model.embed_tokens.weight  # still tied after to_empty
    half = decoder_on_device(config, "cpu", torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in half.parameters())
    assert torch.isfinite(half(input_ids=torch.tensor([[1, 2, 3]])).float()).all()
