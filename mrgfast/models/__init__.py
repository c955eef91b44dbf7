"""Models: the lean packing-aware decoder (Llama / Qwen2 / Qwen2-VL text), HF-directory loading, generation.

- `DecoderConfig`: decoder sizes and RoPE settings; `DecoderConfig.from_hf(config_json_dict)`.
- `Decoder`: `decoder(input_ids=None, inputs_embeds=None, position_ids=None, cu_seqlens=None)` -> final normed
  hidden states; `decoder.compute_logits(hidden)`; `decoder.embed(ids)` to build inputs_embeds.
- `load_decoder(path, dtype=None, device=None)`: a Decoder from an HF directory (safetensors, sharded or not).
- `generate(decoder, input_ids | inputs_embeds, attention_mask, max_new_tokens=..., eos_token_id=...,
  num_beams=1)`: greedy or beam search with a KV cache, batched, any padding side.
- `varlen_attention`: the one attention function (flash-attn / torch varlen on CUDA, per-document SDPA).
"""

from mrgfast.models.attention import Segments, varlen_attention
from mrgfast.models.config import DecoderConfig
from mrgfast.models.decoder import Decoder
from mrgfast.models.generation import KVCache, generate
from mrgfast.models.loading import load_decoder

__all__ = ["Decoder", "DecoderConfig", "KVCache", "Segments", "generate", "load_decoder", "varlen_attention"]
