"""Config or checkpoint -> what an evaluation runs on: the model (with the checkpoint's weights), tokenizer, prompt
builder, media config and samples of a split, and the R2Gen cleaning the run's report metrics use."""

import copy
from pathlib import Path
from typing import Callable, Sequence

from mrgfast.assemble.data import build_tokenizer, read_samples, synthetic_root
from mrgfast.assemble.model import TEMPLATES, build_model, load_initial_weights
from mrgfast.common.rng import seed_everything
from mrgfast.config import RESOLVED_NAME, load_config
from mrgfast.data import PromptBuilder, clean_report_iu_xray, clean_report_mimic_cxr
from mrgfast.training.checkpoint import CheckpointError


def prepare_eval(config, split: str = "test", checkpoint=None):
    """(model of `config` in eval mode, tokenizer, builder, media config (the ImageConfig, or the VolumeConfig of a
    CT recipe), samples of `split`); with `checkpoint`, its adapter and trainable weights are loaded, else the
    adapters stay at their initialisation (the untrained baseline)."""
    config = copy.deepcopy(config)
    # Evaluation reads the report/VQA split (a DPO run trained on preference pairs: score its reports).
    config.mode, config.data.split, config.model.init_from = "sft", split, None
    root = synthetic_root(config) if config.data.dataset == "synthetic" else None
    tokenizer = build_tokenizer(config, root)
    samples = read_samples(config, root)
    if not samples:
        raise ValueError(f"no samples in split {split!r} of {config.data.path or root}")
    seed_everything(config.seed)  # adapters at init are the ones train() starts from with this seed
    parts = build_model(config, tokenizer.vocab_size, len(samples[0].image_paths))
    if checkpoint is not None:
        load_initial_weights(parts.model, Path(checkpoint))
    builder = PromptBuilder(tokenizer, TEMPLATES[config.model.recipe], **parts.builder_kwargs)
    media = parts.volume_config if parts.volume_config is not None else parts.image_config
    return parts.model.eval(), tokenizer, builder, media, samples


def metric_cleaning(config) -> Callable[[str], str]:
    """The R2Gen cleaning the report metrics of a run use: MIMIC-CXR's for MIMIC-CXR text, IU-Xray's otherwise.

    R2Gen scores each dataset on text cleaned by that dataset's own function; MIMIC-CXR's also turns line breaks
    into spaces and collapses runs of '_' and spaces, which IU-Xray's would leave in raw MIMIC text.
    """
    data = config.data
    mimic = data.clean == "mimic_cxr" or (data.dataset == "mimic_cxr" and data.clean != "iu_xray")
    return clean_report_mimic_cxr if mimic else clean_report_iu_xray


def run_config(checkpoint: Path, overrides: Sequence[str]):
    """The training config `checkpoint` was written with (its own config.yaml; for a checkpoint from before they
    recorded it, its output_dir's), with overrides."""
    for directory in (checkpoint, checkpoint.parent):
        if (directory / RESOLVED_NAME).is_file():
            return load_config(directory / RESOLVED_NAME, overrides)
    raise CheckpointError(f"no {RESOLVED_NAME} in {checkpoint} or {checkpoint.parent}: the checkpoint must sit in "
                          "the output_dir of an mrgfast.train run")


def checkpoint_config(checkpoint, overrides: Sequence[str] = ()):
    """The config of the run that wrote the training checkpoint directory `checkpoint`, with overrides."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint={checkpoint}: not a directory")
    return run_config(checkpoint, list(overrides))


def load_for_eval(checkpoint, overrides: Sequence[str] = (), split: str = "test"):
    """prepare_eval for a training checkpoint directory, with the config of the run that wrote it."""
    return prepare_eval(checkpoint_config(checkpoint, overrides), split, Path(checkpoint))
