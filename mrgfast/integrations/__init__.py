"""mrgfast's kernels inside other people's training scripts: HF transformers + PEFT (`hf`), TRL's DPOTrainer (`trl`).

Nothing is imported here: `import mrgfast.integrations.hf` should not pay for TRL, nor the reverse.
"""
