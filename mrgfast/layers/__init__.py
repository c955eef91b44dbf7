"""Drop-in nn.Modules: layers/<op>.py wraps the op of ops/<op>.py (DiagnosticPrefix is plain torch)."""

from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.layers.lora_linear import LoRALinear
from mrgfast.layers.lora_qkv import LoRAQKV

__all__ = ["AffinePromptGenerator", "DiagnosticPrefix", "GroupedProjection", "LoRALinear", "LoRAQKV"]
