"""The training loop: config -> process group -> the output_dir's lock -> set_up (pieces, resume) -> steps with
logging, evaluation, checkpoints and SIGTERM handling -> TrainResult. `python -m mrgfast.train` runs it from the
command line."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from mrgfast.config import TrainConfig
from mrgfast.train.classify import train_classifier
from mrgfast.train.hooks import Evaluations, save
from mrgfast.train.setup import set_up
from mrgfast.train.step import log_step, take_step
from mrgfast.training.distributed import any_rank, init_distributed, teardown
from mrgfast.training.guards import GracefulStop
from mrgfast.training.run_lock import output_dir_lock


@dataclass
class TrainResult:
    """What a run leaves: where, its last checkpoint, the last logged metrics, every logged record, the model, and
    the headline metrics of each evaluation during training (main process); `stop_signal` names the signal a run
    stopped early on (after saving), `start_step` the step it resumed from. An FSDP2 model keeps the process group's
    threads running until the result is dropped and garbage-collected (`gc.collect()`), as main() does."""

    output_dir: Path
    checkpoint: Optional[Path]
    metrics: dict
    model: nn.Module
    step: int
    stopped_early: bool = False
    history: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    stop_signal: Optional[str] = None
    start_step: int = 0


def train(config: TrainConfig, on_step: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Run `config` to schedule.max_steps (resuming when asked), holding `<output_dir>/.lock` throughout (another run
    there fails at once); `on_step(step, outputs)` is called after each step."""
    ctx = init_distributed(config.device, config.distributed.backend, config.distributed.timeout_s)
    try:
        with output_dir_lock(config.output_dir, ctx):
            if config.mode == "classify":  # RAD3D-Prefix's classifier stage: no tokenizer, decoder or packing
                return classify(config, ctx, on_step)
            return run(config, ctx, on_step)
    finally:
        teardown(ctx)


def classify(config: TrainConfig, ctx, on_step) -> TrainResult:
    """train() for mode=classify: the classifier directory is the run's checkpoint, its validation its evaluation."""
    result = train_classifier(config, ctx, on_step)
    return TrainResult(result.output_dir, result.output_dir, result.history[-1] if result.history else {},
                       result.head, result.step, history=result.history, evaluations=[result.evaluation])


def run(config: TrainConfig, ctx, on_step) -> TrainResult:
    """train() inside the process group."""
    state = set_up(config, ctx)
    evaluations = Evaluations(state)
    history, metrics, last_ckpt, stopped = [], {}, state.resumed_from, None
    start_step = saved_at = state.step if state.resumed_from is not None else None
    try:
        with GracefulStop() as stop:
            while state.step < config.schedule.max_steps:
                outputs, lr = take_step(state)
                if on_step is not None:
                    on_step(state.step, outputs)
                if state.step % config.telemetry.log_every == 0 or state.step == config.schedule.max_steps:
                    metrics = log_step(state, outputs, lr)
                    history.append(metrics)
                if evaluations.due():
                    evaluations.run()
                if state.step % config.checkpoint.every_steps == 0:
                    last_ckpt, saved_at = save(state), state.step
                if any_rank(ctx, stop.requested):
                    stopped = stop.reason() or "SIGTERM"  # another rank's signal
                    print(f"mrgfast.train: {stopped} received at step {state.step}: saving and exiting",
                          file=sys.stderr)
                    break
            if (stopped or config.checkpoint.save_at_end) and saved_at != state.step:
                last_ckpt = save(state)
    finally:
        state.telemetry.close()
        evaluations.close()
    return TrainResult(state.out_dir, last_ckpt, metrics, state.core, state.step, stopped is not None, history,
                       evaluations.records, stopped, start_step or 0)
