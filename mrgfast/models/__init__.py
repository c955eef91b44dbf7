"""Models: the lean packing-aware decoder (Llama / Qwen2 / Qwen2-VL text), HF-directory loading, generation.

- `DecoderConfig`: decoder sizes and RoPE settings; `DecoderConfig.from_hf(config_json_dict)`.
- `Decoder`: `decoder(input_ids=None, inputs_embeds=None, position_ids=None, cu_seqlens=None)` -> final normed
  hidden states; `decoder.compute_logits(hidden)`; `decoder.embed(ids)` to build inputs_embeds.
- `load_decoder(path, dtype=None, device=None)`: a Decoder from an HF directory (safetensors, sharded or not).
- `generate(decoder, input_ids | inputs_embeds, attention_mask, max_new_tokens=..., eos_token_id=...,
  num_beams=1)`: greedy or beam search with a KV cache, batched, any padding side.
- `varlen_attention`: the one attention function (flash-attn / torch varlen on CUDA, per-document SDPA), over the
  packed-stream types of `mrgfast.layout` (`Segments`, `AttentionLayout`, `OutputRows`).
- `VisionTower.from_pretrained(path)`: CLIP / SigLIP / Qwen2-VL vision encoders, and EVA ViT-g (timm's or
  LAVIS's files; `models/eva.py`, needs timm) -> `VisionFeatures` (+ grid);
  `Qwen2VLMerger`: Qwen2-VL's merger as a trainable adapter; `ViT` / `ViT3D`: small encoders trained from scratch.
"""

from mrgfast.models.attention import varlen_attention
from mrgfast.models.config import DecoderConfig
from mrgfast.models.decoder import Decoder, decoder_on_device
from mrgfast.models.feature_cache import FeatureCache
from mrgfast.models.generation import KVCache, generate
from mrgfast.models.loading import load_decoder
from mrgfast.models.multimodal import AdapterSpec, MultimodalLM, register_adapter
from mrgfast.models.vision import Qwen2VLMerger, VisionFeatures, VisionTower, qwen2_vl_patchify
from mrgfast.models.vit import ViT, ViT3D

__all__ = ["AdapterSpec", "Decoder", "DecoderConfig", "FeatureCache", "KVCache", "MultimodalLM", "Qwen2VLMerger", "ViT",
           "ViT3D", "VisionFeatures", "VisionTower", "decoder_on_device", "generate", "load_decoder",
           "qwen2_vl_patchify", "register_adapter", "varlen_attention"]
