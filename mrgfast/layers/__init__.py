"""Drop-in nn.Modules built on mrgfast ops."""

from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.lora_linear import LoRALinear
from mrgfast.layers.lora_qkv import LoRAQKV
from mrgfast.layers.token_group_projector import TokenGroupProjector

__all__ = ["AffinePromptGenerator", "DiagnosticPrefix", "LoRALinear", "LoRAQKV", "TokenGroupProjector"]
