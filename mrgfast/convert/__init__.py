"""Converters of other projects' checkpoints into mrgfast's own: `python -m mrgfast.convert <format> SRC OUT`.

minigptv2: MiniGPT-v2's stage-3 `.pth` (PeFoMed's starting point) -> an mrgfast checkpoint directory (the projector
and ln_vision as safetensors, the LoRA weights as a PEFT adapter) that model.init_from takes.
"""
