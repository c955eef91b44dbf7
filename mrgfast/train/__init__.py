"""Training: `train(config)` runs a TrainConfig to its end (`torchrun -m mrgfast.train config=... key=value`).

loop: the loop and TrainResult; setup: building and resuming a run (RunState); step: one optimizer step and its log
record; hooks: checkpoints and evaluation between steps; periodic_eval: evaluation during training; cli: the
command line (its `__main__` runs the embedded demo when given no arguments).
"""

from mrgfast.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
