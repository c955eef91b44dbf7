"""What the loop does between steps: save a checkpoint, evaluate the model being trained (main process)."""

import sys
from pathlib import Path
from typing import Optional

from torch import nn

from mrgfast.common.names import few
from mrgfast.common.rng import capture_rng_state
from mrgfast.train.periodic_eval import PeriodicEval, eval_due
from mrgfast.train.setup import RunState
from mrgfast.train.step import check_guard
from mrgfast.training.checkpoint import ADAPTER_SUFFIX, MODULES_GROUP, adapter_writer, save_checkpoint
from mrgfast.training.distributed import any_rank, barrier, gather_objects
from mrgfast.training.fsdp import adapter_tensors, gather_full_state
from mrgfast.training.guards import NonFiniteError, nonfinite_names, trainable_state


def save(state: RunState) -> Path:
    """Save the state after step `state.step` (rank 0 writes) after the guard's checks and a check that every
    trainable weight and optimizer state is finite (a poisoned checkpoint is never written); returns the checkpoint
    directory."""
    check_guard(state)
    config, ctx, core, optimizer = state.config, state.ctx, state.core, state.pieces.optimizer
    named = [(name, p) for name, p in core.named_parameters() if p.requires_grad]
    bad = nonfinite_names(trainable_state(named, optimizer))
    if any_rank(ctx, bool(bad)):
        raise NonFiniteError(f"not saving step {state.step}: non-finite values in "
                             f"{few(bad) if bad else 'the shards of another rank'}; the run stops without saving")
    rng = gather_objects(ctx, capture_rng_state())
    full = gather_full_state(core, optimizer) if state.sharded else None  # collective: every rank takes part
    path = None
    if ctx.is_main:
        modules, adapter, optimizer_state = saved_weights(core, optimizer, full, config.lora.enabled)
        writers = {ADAPTER_SUFFIX: adapter_writer(core.decoder, adapter)} if config.lora.enabled else {}
        path = save_checkpoint(state.out_dir, state.step, tensors={MODULES_GROUP: modules},
                               optimizer_state=optimizer_state, scheduler=state.pieces.schedule,
                               sampler={"consumed": state.consumed}, rng_states=rng, writers=writers,
                               keep_last=config.checkpoint.keep_last, files=state.checkpoint_files)
    barrier(ctx)
    return path or state.out_dir / f"step-{state.step:06d}"


def saved_weights(core: nn.Module, optimizer, full, lora: bool) -> tuple:
    """(trainable weights outside the decoder, adapter tensors or None for the model's own, optimizer state) to
    save: the model's and optimizer's own, or taken from `full` (gather_full_state) when the trainables are
    sharded, so that the files are the same either way."""
    if full is None:
        return core.trainable_state_dict(), None, optimizer.state_dict()
    # trainable_state_dict's keys only: its values are this rank's shards.
    modules = {name: full.weights[name] for name in core.trainable_state_dict()}
    adapter = adapter_tensors(core, core.decoder, full.weights) if lora else None
    return modules, adapter, full.optimizer


class Evaluations:
    """Evaluation during training: the main process evaluates when eval_due, the others wait at the barrier; the
    records go to telemetry and are kept for TrainResult."""

    def __init__(self, state: RunState):
        config, ctx = state.config, state.ctx
        self.state, self.records = state, []
        # Its samples are read now, so a bad eval.split fails before the first step. Lines logged after the step the
        # run starts from go (a fresh run: all of them).
        self.evaluator: Optional[PeriodicEval] = (PeriodicEval(config, state.out_dir, state.step)
                                                  if config.eval.enabled and ctx.is_main else None)

    def due(self) -> bool:
        """Whether the step just finished is an evaluation step (every rank asks)."""
        return eval_due(self.state.config, self.state.step)

    def run(self) -> None:
        """Evaluate the model as it is after this step (main process); every rank waits for it."""
        state = self.state
        if self.evaluator is not None:
            pieces = state.pieces
            record = self.evaluator.run(state.core, pieces.tokenizer, pieces.builder, pieces.dataset.media_config,
                                        state.step)
            state.telemetry.throughput.exclude(record["seconds"])
            state.telemetry.log_eval(state.step, record)
            self.records.append({"step": state.step, **record})
            print(f"[eval] step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()),
                  file=sys.stderr)
        barrier(state.ctx)

    def close(self) -> None:
        """Close the evaluation log."""
        if self.evaluator is not None:
            self.evaluator.close()
