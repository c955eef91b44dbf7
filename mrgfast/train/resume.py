"""Opening a run in its output_dir (the main process holds its lock): clear what interrupted saves and prunes left,
choose the checkpoint it continues, refuse what would mix two runs' checkpoints or change what the checkpoint was
trained with, and write the config this run trains with (config.yaml, or config-resume-XXXXXX.yaml per resume)."""

import sys
from pathlib import Path
from typing import Optional

from mrgfast.common.names import few
from mrgfast.config import RESOLVED_NAME, RESUMED_NAME, ConfigError, TrainConfig, check_resume_changes, save_resolved
from mrgfast.training.checkpoint import Checkpoint, find_resume, newer_checkpoints, remove_leftovers
from mrgfast.training.distributed import DistContext


def say(ctx: DistContext, line: str) -> None:
    """A line on stderr from the main process."""
    if ctx.is_main:
        print(f"mrgfast.train: {line}", file=sys.stderr)


def open_run(config: TrainConfig, ctx: DistContext, out_dir: Path) -> Optional[Checkpoint]:
    """Prepare `out_dir` for this run and return the checkpoint it continues (None: from the start)."""
    if ctx.is_main:
        removed = remove_leftovers(out_dir)
        if removed:
            say(ctx, f"removed what interrupted saves or prunes left in {out_dir}: {few(removed)}")
    ckpt = find_resume(config.resume, out_dir, log=lambda line: say(ctx, line))
    refuse_later_checkpoints(config.resume, out_dir, ckpt)
    if ckpt is not None:
        changes = check_resume_changes(config, ckpt.path, (len(ckpt.rng_states), ctx.world_size))
        if changes:
            say(ctx, f"resuming {ckpt.path} with changed settings: {', '.join(changes)}")
    if ctx.is_main:
        save_resolved(config, out_dir, RESOLVED_NAME if ckpt is None else RESUMED_NAME.format(step=ckpt.step))
    return ckpt


def refuse_later_checkpoints(resume: str, out_dir: Path, ckpt: Optional[Checkpoint]) -> None:
    """ConfigError when an explicit resume (a path, or none) starts behind checkpoints already in out_dir: resume=auto
    would later prefer those to this run's own, mixing two runs."""
    if resume == "auto":
        return
    step = ckpt.step if ckpt is not None else 0
    later = newer_checkpoints(out_dir, step, besides=ckpt.path if ckpt is not None else None)
    if later:
        raise ConfigError(f"resume={resume}: {out_dir} holds checkpoints after step {step} "
                          f"({few([p.name for p in later])}), which resume=auto would later take over this run's; "
                          "delete them to go back, or run in another output_dir")
