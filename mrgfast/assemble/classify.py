"""Config -> what RAD3D-Prefix's classify stage (mode=classify) runs on: the recipe's frozen volume encoder (built as
the prefix run builds it), its volume preprocessing, the labelled train and validation volumes and the label names."""

import copy
from dataclasses import dataclass

from torch import nn

from mrgfast.assemble.data import read_samples, synthetic_root
from mrgfast.assemble.model import build_vision
from mrgfast.config import ConfigError, TrainConfig
from mrgfast.data import read_ct_reports
from mrgfast.data.volumes import VolumeConfig


@dataclass
class ClassifyInputs:
    """The frozen encoder (eval mode), its feature width and VolumeConfig, train / val samples, label names."""

    encoder: nn.Module
    dim: int
    volume_config: VolumeConfig
    train: list
    val: list
    labels: list
    val_source: str


def label_names(samples, where: str) -> list:
    """The label names every sample carries (the labels CSV's columns, in order); ConfigError when a sample has none
    or other names."""
    if not samples:
        raise ConfigError(f"{where}: no samples")
    names = None
    for sample in samples:
        if not sample.labels:
            raise ConfigError(f"{where}: sample {sample.id!r} has no labels (a reports CSV read without its labels "
                              "CSV?)")
        if names is None:
            names = list(sample.labels)
        elif list(sample.labels) != names:
            raise ConfigError(f"{where}: sample {sample.id!r} has labels {list(sample.labels)[:3]}..., the first "
                              f"sample {names[:3]}...")
    return names


def val_samples(config: TrainConfig):
    """(validation samples, where they came from): the synthetic twin's classify.val_split, or CT-RATE's validation
    CSVs (classify.val_path / val_labels_path, volumes under classify.val_image_dir or data.image_dir)."""
    c, data = config.classify, config.data
    if data.dataset == "synthetic":
        val_config = copy.deepcopy(config)
        val_config.data.split = c.val_split
        root = synthetic_root(val_config)
        try:
            return read_samples(val_config, root), f"{root} split {c.val_split!r}"
        except ValueError as err:
            raise ConfigError(f"classify.val_split={c.val_split!r}: {err}") from None
    image_dir = c.val_image_dir or data.image_dir
    if image_dir is None:
        raise ConfigError("classify.val_image_dir: dataset 'ct_rate' needs the validation volumes' directory")
    samples = read_ct_reports(c.val_path, image_dir, labels_csv=c.val_labels_path,
                              skip_bad_samples=data.skip_bad_samples, allow_outside=data.allow_outside_image_dir)
    return samples, str(c.val_path)


def classify_inputs(config: TrainConfig) -> ClassifyInputs:
    """The encoder and the labelled volumes of a mode=classify config; train and val must carry the same labels."""
    root = synthetic_root(config) if config.data.dataset == "synthetic" else None
    train = read_samples(config, root)
    train_source = str(config.data.labels_path or f"{root} split {config.data.split!r}")
    labels = label_names(train, train_source)
    val, val_source = val_samples(config)
    if label_names(val, val_source) != labels:
        raise ConfigError(f"classify: the validation labels ({val_source}) are not the training labels' columns "
                          f"({train_source}: {labels[:3]}..., {len(labels)} in all)")
    if len(labels) != config.model.n_labels:
        raise ConfigError(f"model.n_labels={config.model.n_labels}, but {train_source} has {len(labels)} label "
                          f"columns ({', '.join(labels[:3])}, ...): the prefix run's classifier must give n_labels "
                          "logits")
    encoder, dim, volume_config = build_vision(config)
    return ClassifyInputs(encoder.eval().requires_grad_(False), dim, volume_config, list(train), list(val), labels,
                          val_source)
