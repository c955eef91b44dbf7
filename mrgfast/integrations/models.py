"""The transformers model classes mrgfast patches, what their forward looks like, and finding one inside a PeftModel."""

import inspect
import sys
from dataclasses import dataclass

import transformers
from torch import nn
from transformers import modeling_outputs

# The forwards' named parameters as each transformers release spells them. 5.17 (the H200 image's) names the cache
# `past_key_values`; later 5.x releases (5.25 here) name it `cache` and give the VL classes `mm_encoder_outputs`.
TEXT = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "labels", "use_cache",
        "logits_to_keep")
VISION = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "labels", "use_cache",
          "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")
TEXT_5_17 = tuple("past_key_values" if name == "cache" else name for name in TEXT)
VISION_5_17 = tuple("past_key_values" if name == "cache" else name for name in VISION)
# Not passed on to the backbone: the class's forward consumes them itself.
HEAD_ARGUMENTS = ("labels", "logits_to_keep")


@dataclass(frozen=True)
class Known:
    """A class's forward as the patch was written against it: the backbone `self.model` gets every named parameter
    but HEAD_ARGUMENTS (and **kwargs), then slice -> lm_head -> loss_function -> `output`."""

    parameters: tuple
    output: str  # its output type's name: in transformers.modeling_outputs, else in the class's own module

    def output_type(self, model_class: type) -> type:
        """The output class this form's forward returns, for `model_class`."""
        found = getattr(modeling_outputs, self.output, None) or getattr(sys.modules[model_class.__module__],
                                                                        self.output, None)
        if found is None:  # a KNOWN entry out of step with transformers: a bug here, not the user's
            raise LookupError(f"{self.output} is in neither transformers.modeling_outputs nor {model_class.__module__}")
        return found


# Every form a class's forward has taken in the transformers releases tested; a forward matching none is refused.
KNOWN = {
    "LlamaForCausalLM": (Known(TEXT, "CausalLMOutputWithPast"), Known(TEXT_5_17, "CausalLMOutputWithPast")),
    "Qwen2ForCausalLM": (Known(TEXT, "CausalLMOutputWithPast"), Known(TEXT_5_17, "CausalLMOutputWithPast")),
    "Qwen2VLForConditionalGeneration": (
        Known(VISION + ("logits_to_keep", "mm_encoder_outputs"), "MultimodalCausalLMOutputWithPast"),
        Known(VISION_5_17 + ("logits_to_keep",), "Qwen2VLCausalLMOutputWithPast")),
    "Qwen2_5_VLForConditionalGeneration": (
        Known(VISION + ("second_per_grid_ts", "logits_to_keep", "mm_encoder_outputs"),
              "MultimodalCausalLMOutputWithPast"),
        Known(VISION_5_17 + ("second_per_grid_ts", "logits_to_keep"), "Qwen2_5_VLCausalLMOutputWithPast")),
}


def known_classes() -> list:
    """The names of the KNOWN classes this transformers has (Qwen2.5-VL is missing from old releases)."""
    return [name for name in KNOWN if hasattr(transformers, name)]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT PeftModel, or `model` itself."""
    try:
        from peft import PeftModel
    except ImportError:  # without PEFT there is no PeftModel to look inside
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def named_parameters(forward) -> tuple:
    """The named parameters of a forward, self and **kwargs left out (decorators followed to the function)."""
    return tuple(name for name, p in inspect.signature(forward).parameters.items()
                 if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def check_known(hf_model: nn.Module, what: str) -> Known:
    """The Known entry for this model's exact class; TypeError for any other class, ValueError when this
    transformers' forward differs from the one the patch was written against."""
    name = type(hf_model).__name__
    if name not in KNOWN or type(hf_model) is not getattr(transformers, name, None):
        raise TypeError(f"{what} knows {', '.join(known_classes())} (each with or without a PEFT PeftModel around "
                        f"it), not {type(hf_model).__module__}.{type(hf_model).__qualname__}; nothing was patched")
    found = named_parameters(type(hf_model).forward)
    for known in KNOWN[name]:
        if found == known.parameters:
            return known
    written = " or ".join(str(known.parameters) for known in KNOWN[name])
    raise ValueError(f"{what}: {name}.forward in transformers {transformers.__version__} takes {found}, not the "
                     f"{written} it was written against; nothing was patched")
