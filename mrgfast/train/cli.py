"""The training command line: `torchrun [--nproc_per_node N] -m mrgfast.train config=configs/x.yaml [key=value ...]`."""

import gc
import sys

from mrgfast.config import ConfigError, parse_cli
from mrgfast.train.loop import train
from mrgfast.training.guards import NonFiniteLossError


def main(argv=None) -> int:
    """Train the run that `config=...` and `key=value` overrides describe; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    code = train_from_cli(argv)
    # An FSDP2 model holds the process group, and so its gloo/NCCL threads, through its device mesh, inside
    # reference cycles that outlive train_from_cli's frame: collect them now, while the interpreter is whole. Left to
    # interpreter shutdown, running group threads are the likely cause of the rare exit abort "terminate called
    # without an active exception".
    gc.collect()
    return code


def train_from_cli(argv: list) -> int:
    """Train the run the arguments describe and report how it ended: 0 done, 1 non-finite loss, 2 config error."""
    try:
        config = parse_cli(argv)
        result = train(config)
    except ConfigError as err:
        print(f"mrgfast.train: config error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"mrgfast.train: {err}", file=sys.stderr)
        return 1
    print(f"mrgfast.train: finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0
