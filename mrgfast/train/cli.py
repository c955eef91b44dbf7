"""The training command line: `torchrun [--nproc_per_node N] -m mrgfast.train config=configs/x.yaml [key=value ...]
[--debug]`; its exit codes are mrgfast.common.exit_codes' (README: "Exit codes and faults")."""

import gc

from mrgfast.common.program import run_program
from mrgfast.config import parse_cli
from mrgfast.train.loop import train
from mrgfast.training.guards import StoppedBySignal


def main(argv=None) -> int:
    """Train the run that `config=...` and `key=value` overrides describe; returns the exit code."""
    code = run_program("train", train_from_cli, argv)
    # An FSDP2 model holds the process group, and so its gloo/NCCL threads, through its device mesh, inside
    # reference cycles that outlive train_from_cli's frame: collect them now, while the interpreter is whole. Left to
    # interpreter shutdown, running group threads are the likely cause of the rare exit abort "terminate called
    # without an active exception".
    gc.collect()
    return code


def train_from_cli(argv: list) -> int:
    """Train the run the arguments describe: 0 when it reached schedule.max_steps; a run stopped by a signal (after
    saving) raises StoppedBySignal, so that `train && evaluate` does not go on with an unfinished model."""
    config = parse_cli(argv)
    result = train(config)
    if result.stop_signal is not None:
        raise StoppedBySignal(result.stop_signal, result.step, result.checkpoint)
    if result.step == result.start_step:
        print(f"mrgfast.train: nothing to train: {result.checkpoint} is at schedule.max_steps="
              f"{config.schedule.max_steps} already")
    else:
        print(f"mrgfast.train: finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0
