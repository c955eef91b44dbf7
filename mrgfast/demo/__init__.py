"""The embedded demo: `python -m mrgfast.train` with no arguments (or `python -m mrgfast.demo`).

base_models: synthetic data + a small decoder and ViT pretrained in a short cached phase (no downloads);
run: untrained baseline -> PEFT SFT (frozen decoder, LoRA q/v, GroupedProjection) -> DPO, each evaluated.
"""

from mrgfast.demo.run import DemoOptions, main, run_demo

__all__ = ["DemoOptions", "main", "run_demo"]
