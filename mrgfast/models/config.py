"""DecoderConfig: the decoder's shape and RoPE settings, read from a Hugging Face config.json."""

import dataclasses
from typing import Optional

# Supported HF class names -> what differs between them: defaults HF uses when config.json omits a field,
# whether q/k/v carry a bias (None: Llama's attention_bias decides), and whether RoPE is Qwen2-VL's M-RoPE.
ARCHITECTURES = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=None, mrope=False),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=True, mrope=False),
    "Qwen2VLForConditionalGeneration": dict(rms_norm_eps=1e-5, rope_theta=1000000.0, qkv_bias=True, mrope=True),
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Qwen2-VL's text model uses this split when config.json names none (transformers' default).
DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclasses.dataclass
class DecoderConfig:
    """Sizes and options of a Llama/Qwen2-family decoder (field names follow HF's config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...} as in HF's rope_parameters.
    rope_scaling: Optional[dict] = None
    # Qwen2-VL's M-RoPE: how many of the head_dim/2 frequencies follow the temporal, height and width axes.
    mrope_section: Optional[tuple] = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        check_positive_ints(self, sizes)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive_ints(self, ("num_key_value_heads", "head_dim"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.mrope_section is not None:
            self.mrope_section = tuple(int(s) for s in self.mrope_section)
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(f"mrope_section must be 3 ints summing to head_dim/2 = {self.head_dim // 2}, "
                                 f"got {list(self.mrope_section)}")

    @classmethod
    def from_hf(cls, hf_config: dict, source: str = "config.json") -> "DecoderConfig":
        """The decoder of an HF config.json dict (Llama, Qwen2, or Qwen2-VL's text model); ValueError otherwise."""
        arch = hf_architecture(hf_config, source)
        defaults = ARCHITECTURES[arch]
        # transformers 5 nests Qwen2-VL's text fields in text_config; older saves keep them at the top level.
        text = dict(hf_config.get("text_config") or hf_config) if arch.startswith("Qwen2VL") else hf_config
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in text]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} for {arch}")
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={text['hidden_act']!r} is not supported; expected 'silu'")
        if text.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (full causal attention only)")
        rope, theta, mrope_section = parse_rope(text, defaults, source)
        qkv_bias = defaults["qkv_bias"]
        if qkv_bias is None:  # Llama: attention_bias puts a bias on q, k, v and o alike.
            qkv_bias = bool(text.get("attention_bias", False))
        # Qwen2-VL before transformers 5 kept tie_word_embeddings in the text part; either place counts.
        tie = bool(hf_config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                   intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
                   num_attention_heads=text["num_attention_heads"],
                   num_key_value_heads=text.get("num_key_value_heads"),
                   # HF's Qwen2-VL attention ignores head_dim and always uses hidden_size / heads.
                   head_dim=None if defaults["mrope"] else text.get("head_dim"),
                   rms_norm_eps=float(text.get("rms_norm_eps", defaults["rms_norm_eps"])), rope_theta=theta,
                   rope_scaling=rope, mrope_section=mrope_section,
                   max_position_embeddings=int(text.get("max_position_embeddings", 2048)), qkv_bias=qkv_bias,
                   o_bias=arch == "LlamaForCausalLM" and bool(text.get("attention_bias", False)),
                   mlp_bias=arch == "LlamaForCausalLM" and bool(text.get("mlp_bias", False)),
                   tie_word_embeddings=tie)


def check_positive_ints(config: "DecoderConfig", names) -> None:
    """ValueError naming the first of `names` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")


def hf_architecture(hf_config: dict, source: str = "config.json") -> str:
    """The supported architecture named by config.json's `architectures`; ValueError listing the supported ones."""
    names = hf_config.get("architectures")
    supported = [n for n in names or [] if n in ARCHITECTURES]
    if not supported:
        raise ValueError(f"{source}: architectures={names!r} is not supported; mrgfast loads "
                         f"{', '.join(ARCHITECTURES)}")
    return supported[0]


def parse_rope(text: dict, defaults: dict, source: str):
    """(rope_scaling or None, rope_theta, mrope_section or None) from HF's rope_parameters or legacy rope_scaling."""
    # transformers 5 writes rope_parameters (with rope_theta inside); older files write rope_scaling + rope_theta.
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", text.get("rope_theta", defaults["rope_theta"])))
    rope_type = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    mrope_section = None
    if defaults["mrope"]:
        # Qwen2-VL marks M-RoPE as type "mrope" (saved beside rope_type "default" by transformers 5).
        mrope_section = tuple(params.pop("mrope_section", DEFAULT_MROPE_SECTION))
        rope_type = "default" if rope_type == "mrope" else rope_type
    elif rope_type == "mrope" or "mrope_section" in params:
        raise ValueError(f"{source}: M-RoPE (mrope_section) is only supported for Qwen2VLForConditionalGeneration")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; expected one of {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return None, theta, mrope_section
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", text.get("max_position_embeddings", 2048))
    return dict(params, rope_type=rope_type), theta, mrope_section


def check_rope_scaling(rope: Optional[dict]) -> Optional[dict]:
    """The rope_scaling dict with its required fields checked; ValueError naming a missing or bad one."""
    if rope is None:
        return None
    rope = dict(rope)
    rope_type = rope.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    required = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in required[rope_type]:
        if not isinstance(rope.get(key), (int, float)) or isinstance(rope.get(key), bool):
            raise ValueError(f"rope_scaling of type {rope_type!r} needs a number {key!r}, got {rope.get(key)!r}")
    return None if rope_type == "default" else rope


def hf_llama_config(config: DecoderConfig, tokenizer) -> dict:
    """config.json in transformers' Llama format for `config` (the reverse of reading one); the special token ids
    come from `tokenizer`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "float32"}
