"""Evaluation during training: mrgfast.evaluate on the model being trained, every `eval.every_steps` steps and/or
after the last one (`eval.at_end`), on the main process. Each evaluation writes `eval-step-XXXXXX.json` and its
generations into the output directory and one line of headline metrics into `eval.jsonl`."""

import copy
import time
from pathlib import Path
from typing import Optional

from mrgfast.assemble import metric_cleaning, read_samples, synthetic_root
from mrgfast.common.rng import capture_rng_state, restore_rng_state
from mrgfast.config import ConfigError, TrainConfig
from mrgfast.evaluate import evaluate_model
from mrgfast.metrics import flatten_metrics
from mrgfast.training.metrics_log import JsonlLogger

EVAL_LOG = "eval.jsonl"
# The metrics eval.jsonl keeps per evaluation (those the run's task has); the step's JSON file holds all of them.
HEADLINE = ("report/BLEU_4", "report/METEOR", "report/CIDEr", "clinical/macro_f1", "hallucination/rate",
            "vqa/overall", "vqa/closed", "vqa/open", "generation/seconds")


def eval_samples(config: TrainConfig) -> list:
    """The samples of eval.split that the run's data section points at, read as for SFT (a DPO run on the
    synthetic twin is scored on its reports), cut to eval.limit."""
    eval_config = copy.deepcopy(config)
    eval_config.mode, eval_config.data.split = "sft", config.eval.split
    root = synthetic_root(eval_config) if eval_config.data.dataset == "synthetic" else None
    try:
        samples = list(read_samples(eval_config, root))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"eval.split={config.eval.split!r}: {err}") from None
    if not samples:
        raise ConfigError(f"eval.split: no samples in split {config.eval.split!r} of {config.data.path or root}")
    return samples[:config.eval.limit]


def eval_due(config: TrainConfig, step: int) -> bool:
    """Whether the step just finished is an evaluation step (every rank asks: the others wait for the main one)."""
    every = config.eval.every_steps
    return (every > 0 and step % every == 0) or (config.eval.at_end and step == config.schedule.max_steps)


class PeriodicEval:
    """Decides when to evaluate and does it: the samples are read once, at construction, so a bad eval.split fails
    before training starts."""

    def __init__(self, config: TrainConfig, output_dir: Path, resume_step: Optional[int] = None):
        self.section = config.eval
        self.skip_bad_samples = config.data.skip_bad_samples
        self.output_dir = Path(output_dir)
        self.samples = eval_samples(config)
        self.clean = metric_cleaning(config)
        # A resumed run redoes the steps after its checkpoint: their lines go, as in the training log.
        self.log = JsonlLogger(self.output_dir / EVAL_LOG, resume_step=resume_step)

    def run(self, model, tokenizer, builder, image_config, step: int) -> dict:
        """Evaluate `model` now; returns the headline record written to eval.jsonl (plus `seconds`).

        The RNG states are put back afterwards, so a run that evaluates trains exactly as one that does not.
        """
        state, start = capture_rng_state(), time.perf_counter()
        try:
            metrics = evaluate_model(model, tokenizer, self.samples, builder, image_config,
                                     batch_size=self.section.batch_size, num_beams=self.section.num_beams,
                                     max_new_tokens=self.section.max_new_tokens, meteor=self.section.meteor,
                                     clean=self.clean, output_dir=self.output_dir, name=f"eval-step-{step:06d}",
                                     log=None, skip_bad_samples=self.skip_bad_samples)
        finally:
            restore_rng_state(state, "the state before evaluation")
        flat = flatten_metrics(metrics)
        record = {key: flat[key] for key in HEADLINE if flat.get(key) is not None}
        record["seconds"] = time.perf_counter() - start
        self.log.log(step, record)
        return record

    def close(self) -> None:
        """Close eval.jsonl."""
        self.log.close()
