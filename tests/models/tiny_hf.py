"""Tiny random HF models (the test oracle) and helpers to run them beside mrgfast's Decoder."""

import torch
import transformers

VOCAB = 128
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB)
# Qwen2-VL's special tokens moved inside the tiny vocabulary.
VL_TOKENS = dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)


def llama(**overrides):
    """A tiny LlamaForCausalLM; a larger init than HF's 0.02 gives peaked, non-tied next-token scores."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(SIZES, initializer_range=0.2, **overrides)))


def qwen2(**overrides):
    """A tiny Qwen2ForCausalLM (q/k/v with bias)."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**dict(SIZES, initializer_range=0.2, **overrides)))


def qwen2_vl(**overrides):
    """A tiny Qwen2VLForConditionalGeneration with a small vision tower; M-RoPE over head_dim/2 = 8 frequencies."""
    text = dict(SIZES, initializer_range=0.2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=VISION, **VL_TOKENS, **overrides)
    return transformers.Qwen2VLForConditionalGeneration(config)


BUILDERS = {
    "llama": lambda: llama(),
    "llama_bias": lambda: llama(attention_bias=True, mlp_bias=True, head_dim=24),
    "llama3": lambda: llama(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=64)),
    "linear": lambda: llama(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "dynamic": lambda: llama(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8),
    "tied": lambda: llama(tie_word_embeddings=True),
    "qwen2": lambda: qwen2(),
    "qwen2_tied": lambda: qwen2(tie_word_embeddings=True),
    "qwen2_vl": lambda: qwen2_vl(),
}
TEXT_MODELS = ["llama", "llama_bias", "llama3", "linear", "dynamic", "tied", "qwen2", "qwen2_tied"]


def random_ids(*shape, seed=0, high=100):
    """Random token ids below `high` (clear of the Qwen2-VL special tokens)."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(model, **inputs):
    """fp32 logits of an HF model, without grad."""
    with torch.no_grad():
        return model(**inputs).logits.float()


def our_logits(decoder, **inputs):
    """fp32 logits of a mrgfast Decoder, without grad."""
    with torch.no_grad():
        return decoder.compute_logits(decoder(**inputs)).float()


def vl_inputs(prefix: int, suffix: int, grid=(1, 4, 4), seed=0) -> dict:
    """HF Qwen2-VL inputs for one prompt: `prefix` text tokens, <vision_start>, the image's tokens, <vision_end>,
    `suffix` text tokens; with pixel_values for a (t, h, w) patch grid and the mm_token_type_ids HF needs."""
    t, h, w = grid
    n_image = t * h * w // VISION["spatial_merge_size"] ** 2
    ids = torch.cat([random_ids(prefix, seed=seed), torch.tensor([VL_TOKENS["vision_start_token_id"]]),
                     torch.full((n_image,), VL_TOKENS["image_token_id"]),
                     torch.tensor([VL_TOKENS["vision_end_token_id"]]), random_ids(suffix, seed=seed + 1)])[None]
    patch = VISION["in_channels"] * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
    pixels = torch.randn(t * h * w, patch, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([list(grid)]),
                mm_token_type_ids=(ids == VL_TOKENS["image_token_id"]).int())


def vl_embeds_and_positions(model, inputs: dict, attention_mask=None):
    """What HF's Qwen2VLModel feeds its text model: token embeddings with the image features spliced in at the
    image tokens, and the 3-axis M-RoPE position ids of its get_rope_index."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                            return_dict=True).pooler_output)
        is_image = (ids == VL_TOKENS["image_token_id"])[..., None]
        embeds = embeds.masked_scatter(is_image, features.to(embeds.dtype))
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=attention_mask)
    return embeds, positions
