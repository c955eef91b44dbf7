"""norms=True: a transformers model's RMSNorm and SwiGLU MLP instances computed by mrgfast.ops.rms_norm and swiglu.

RoPE stays transformers' own: their attention applies it through a module-level function (apply_rotary_pos_emb)
that an instance patch cannot reach without replacing the whole attention forward, and with it the model's choice
of attention kernel (sdpa, flash, eager).
"""

from torch import Tensor, nn

from mrgfast.ops.rms_norm import rms_norm
from mrgfast.ops.swiglu import swiglu

# The classes whose forward is exactly HF's RMSNorm (fp32 statistics, cast back before the weight) or SwiGLU MLP
# (down(act(gate(x)) * up(x))) in the supported models, their language models and Qwen2.5-VL's vision blocks alike.
RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm"}
SWIGLU_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen2_5_VLMLP"}
SILU_NAMES = {"SiLU", "SiLUActivation"}


def fused_rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    """HF's RMSNorm through mrgfast.ops.rms_norm (the same math: fp32 statistics, cast back before the weight)."""
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)[0]


def fused_swiglu_mlp_forward(self, x: Tensor) -> Tensor:
    """HF's SwiGLU MLP with silu(gate) * up in one fused op between its projections (LoRA ones included)."""
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def norm_layers(model: nn.Module) -> list:
    """(name, module, fused forward) of every RMSNorm and SiLU-gated MLP instance the fused ops compute exactly."""
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in RMS_NORMS and hasattr(module, "variance_epsilon"):
            found.append((name, module, fused_rms_norm_forward))
        elif (kind in SWIGLU_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_NAMES
              and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            found.append((name, module, fused_swiglu_mlp_forward))
    return found
