"""Decoder: a lean, packing-aware Llama/Qwen2/Qwen2-VL text decoder with Hugging Face module names."""

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mrgfast.layers.lora_qkv import LoRAQKV
from mrgfast.layout import AttentionLayout, OutputRows, Segments
from mrgfast.models.attention import varlen_attention
from mrgfast.models.config import DecoderConfig
from mrgfast.models.elementwise import elementwise
from mrgfast.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.elementwise = elementwise("off")  # how the regions run: set by Decoder.fused_elementwise

    def forward(self, x: Tensor) -> Tensor:
        """x / rms(x) * weight over the last dim."""
        return self.elementwise.norm(x, self.weight, self.eps)[0]

    def add_norm(self, x: Tensor, residual: Tensor):
        """(RMSNorm(residual + x), residual + x): a pre-norm block's residual add and the norm after it."""
        return self.elementwise.norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Grouped-query self-attention on a packed stream [T, hidden]; q/k/v/o are plain nn.Linear (LoRA targets)."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)
        self.fuse_qkv = True  # q/k/v LoRA through one fused op when possible (fused_qkv)
        self.elementwise = elementwise("off")  # how RoPE runs: set by Decoder.fused_elementwise

    def fused_qkv(self) -> Optional[LoRAQKV]:
        """One fused q/k/v op when all three projections carry LoRA that can share it (LoRAQKV's rules), else None.

        Built on first use and rebuilt when the projections change (LoRA applied or removed later); kept out of the
        module tree, so state dicts, adapters and parameter names are the projections' own.
        """
        if not self.fuse_qkv:
            return None
        projections = (self.q_proj, self.k_proj, self.v_proj)
        key = tuple(id(p) for p in projections)
        cached = self.__dict__.get("_fused_qkv")
        if cached is None or cached[0] != key:
            try:
                fused = LoRAQKV(*projections)
            except ValueError:  # not all LoRA, or LoRA that cannot share one input / buffer / dropout
                fused = None
            self.__dict__["_fused_qkv"] = cached = (key, fused)
        return cached[1]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: AttentionLayout, cache=None,
                rows: Optional[OutputRows] = None) -> Tensor:
        """Attention output [T, hidden]; keys follow `layout` (gathered when it says so), and with a KV cache the
        new keys join each sequence's cached ones. With `rows`, only those rows query (keys and values still
        come from every token): the output is [len(rows.index), hidden]."""
        tokens = x.shape[0]
        fused = self.fused_qkv() if rows is None else None  # with rows, q reads other inputs than k and v
        if fused is not None:
            q, k, v = fused(x)
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        k = self.elementwise.rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        seg_q = layout.seg_q
        if rows is not None:
            x, cos, sin, seg_q = (x.index_select(0, rows.index), cos.index_select(0, rows.index),
                                  sin.index_select(0, rows.index), rows.seg)
        if fused is None:
            q = self.q_proj(x)
        q = self.elementwise.rope(q.view(x.shape[0], self.num_heads, self.head_dim), cos, sin)
        k, v = layout.gather(k, v)
        seg_k = layout.seg_k
        if cache is not None:
            k, v, seg_k = cache.update(self.layer_idx, k, v)
        out = varlen_attention(q, k, v, seg_q, seg_k, scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.elementwise = elementwise("off")  # how silu(gate) * up runs: set by Decoder.fused_elementwise

    def forward(self, x: Tensor) -> Tensor:
        """The feed-forward output, same shape as x."""
        return self.down_proj(self.elementwise.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: AttentionLayout, cache=None,
                rows: Optional[OutputRows] = None) -> Tensor:
        """The block's output [T, hidden] (with `rows`: for those rows only, [len(rows.index), hidden])."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, layout, cache, rows)
        residual = x if rows is None else x.index_select(0, rows.index)
        normed, x = self.post_attention_layernorm.add_norm(attended, residual)
        return x + self.mlp(normed)


class Decoder(nn.Module):
    """Llama/Qwen2-family causal decoder whose parameter names match HF's *ForCausalLM state dicts
    (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ..., `model.norm`, `lm_head`)."""

    def __init__(self, config: DecoderConfig, fused_elementwise: str = "off"):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.fused_elementwise = fused_elementwise
        self.tie_weights()

    @property
    def fused_elementwise(self) -> str:
        """How RMSNorm (+ residual add), RoPE and SwiGLU run: "off" (eager, the default), "triton" (mrgfast's fused
        ops) or "compile" (torch.compile'd regions); see mrgfast.models.elementwise."""
        return self.model.norm.elementwise.mode

    @fused_elementwise.setter
    def fused_elementwise(self, mode: str) -> None:
        regions = elementwise(mode)
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.elementwise = regions

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [..., hidden]; build inputs_embeds from these to splice in other features."""
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cu_seqlens=None, cache=None,
                layout: Optional[AttentionLayout] = None, output_rows: Optional[OutputRows] = None) -> Tensor:
        """Final normed hidden states [B, S, hidden] for input_ids [B, S] or inputs_embeds [B, S, hidden].

        cu_seqlens (int32, [docs + 1]) marks documents in the flattened B*S stream, which attend only within
        themselves; without it each row is one document. position_ids is [B, S] (or [3, B, S] for M-RoPE);
        by default positions restart at 0 in each document (after the cached tokens when `cache` is given).
        `layout` (an AttentionLayout, instead of cu_seqlens; no cache) lets a document's queries attend to keys
        gathered from elsewhere in the stream, e.g. DPO's shared prompt; default positions then start each
        document after its extra keys.

        `output_rows` (training: the rows a loss reads, a suffix of each document) returns the final hidden
        states of those rows only, [len(output_rows.index), hidden]: the last block then computes its queries,
        attention output and MLP for them alone (exact: its keys and values still cover every token).
        """
        x = self.input_embeddings(input_ids, inputs_embeds)
        batch, seq, hidden = x.shape
        layout = self.attention_layout(cu_seqlens, layout, cache, batch, seq, x.device)
        seg = layout.seg_q
        offsets = cache.lengths if cache is not None else layout.position_offsets()
        positions = self.flat_positions(position_ids, seg, batch, seq, x.device, offsets)
        cos, sin = self.rotary(positions)
        h = x.reshape(batch * seq, hidden)
        if cache is not None:
            cache.begin(seg.lengths)  # document i of this forward extends cached sequence i
        if output_rows is not None:
            output_rows.check(layout, cache)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            rows = output_rows if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                h = checkpoint(layer, h, cos, sin, layout, None, rows, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layout, cache, rows)
        if cache is not None:
            cache.commit()
        if output_rows is not None:
            return self.model.norm(h)
        return self.model.norm(h).view(batch, seq, hidden)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """LM-head logits [..., vocab] for hidden states (evaluation only: training uses the fused loss)."""
        return self.lm_head(hidden)

    def input_embeddings(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """Exactly one of input_ids [B, S] or inputs_embeds [B, S, hidden], as embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder: pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            return self.embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], "
                             f"got shape {tuple(inputs_embeds.shape)}")
        return inputs_embeds

    @classmethod
    def attention_layout(cls, cu_seqlens, layout: Optional[AttentionLayout], cache, batch: int, seq: int,
                         device) -> AttentionLayout:
        """The forward's AttentionLayout: the one given (checked against the stream), or causal documents."""
        if layout is None:
            return AttentionLayout.causal(cls.segments(cu_seqlens, batch, seq, device))
        if cu_seqlens is not None or cache is not None:
            raise ValueError("Decoder: pass layout alone, without cu_seqlens or cache (the layout holds the documents)")
        if not isinstance(layout, AttentionLayout):
            raise ValueError(f"layout must be an AttentionLayout, got {type(layout).__name__}")
        layout.check(batch * seq)
        return layout.to(device)

    @staticmethod
    def segments(cu_seqlens, batch: int, seq: int, device) -> Segments:
        """The documents of the flattened stream: from cu_seqlens, or one per row."""
        if cu_seqlens is None:
            return Segments.from_lengths([seq] * batch, device)
        return Segments.from_cu_seqlens(cu_seqlens, batch * seq, device)

    def flat_positions(self, position_ids: Optional[Tensor], seg: Segments, batch: int, seq: int, device,
                       offsets: Sequence[int]) -> Tensor:
        """Position ids of the flattened stream: [T], or [3, T] for 3-axis M-RoPE ids; by default document i
        counts from offsets[i] (its cached tokens, or keys that precede its queries)."""
        if position_ids is None:
            # Continue each document after the tokens it sees before its own.
            starts = torch.tensor(seg.bounds[:-1], device=device) - torch.tensor(offsets, device=device,
                                                                                 dtype=torch.long)
            lengths = torch.tensor(seg.lengths, device=device)
            return torch.arange(batch * seq, device=device) - starts.repeat_interleave(lengths)
        axes = position_ids.shape[:-2]
        if tuple(position_ids.shape[-2:]) != (batch, seq) or axes not in ((), (3,)):
            raise ValueError(f"position_ids must be [{batch}, {seq}] or [3, {batch}, {seq}], "
                             f"got shape {tuple(position_ids.shape)}")
        return position_ids.reshape(*axes, batch * seq)


def decoder_on_device(config: DecoderConfig, device, dtype: Optional[torch.dtype] = None) -> Decoder:
    """A randomly initialised Decoder allocated and initialised on `device` in `dtype`, never as an fp32 copy on the
    CPU first: built on the meta device, then each module initialised in place, in construction order (so the same
    seed gives Decoder(config)'s fp32 weights)."""
    with torch.device("meta"):
        decoder = Decoder(config)
    decoder.to_empty(device=device)
    if dtype is not None:
        decoder.to(dtype)
    with torch.no_grad():
        for module in decoder.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
    decoder.tie_weights()  # to_empty gave the tied LM head a tensor of its own
    return decoder
