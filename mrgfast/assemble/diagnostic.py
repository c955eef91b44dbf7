"""RAD3D-Prefix's frozen diagnostic classifier for the prefix run: the one the classify stage trained
(model.classifier_from), checked against the model, or a random one for tests (model.classifier=random)."""

import sys
from typing import Optional

import torch
from torch import nn

from mrgfast.config import ConfigError, TrainConfig
from mrgfast.models.classifier_io import describe, load_classifier, module_digest


def log(line: str) -> None:
    """One line on stderr about the classifier the run uses."""
    print(f"mrgfast: rad3d_prefix diagnostic classifier: {line}", file=sys.stderr)


def prefix_classifier(config: TrainConfig, vision: Optional[nn.Module], dim: int) -> nn.Linear:
    """The [dim -> n_labels] head whose logits feed DiagnosticPrefix: model.classifier_from's weights, or random
    (model.classifier=random). A file whose input width, label count or encoder differs from this model's is a
    ConfigError naming the file and the field."""
    m = config.model
    # Drawn either way, so a run with the trained classifier and one with a random one start every other module
    # (the mapper) from the same weights.
    head = nn.Linear(dim, m.n_labels)
    if m.classifier == "random":
        unread = f"; model.classifier_from={m.classifier_from} not loaded" if m.classifier_from else ""
        log(f"RANDOM (model.classifier=random{unread}): for tests only; the paper's priors come from a trained "
            "classifier (model.classifier_from)")
        return head
    if m.classifier_from is None:  # TrainConfig refuses this too; a config built by hand may not have been checked
        raise ConfigError("model.classifier_from: RAD3D-Prefix needs its trained diagnostic classifier, or "
                          "model.classifier=random (tests only)")
    try:
        saved = load_classifier(m.classifier_from)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model.classifier_from: {err}") from None
    where = f"model.classifier_from: {saved.config_file}"
    if saved.input_dim != dim:
        raise ConfigError(f"{where}: field 'input_dim' is {saved.input_dim}, but this model's volume encoder gives "
                          f"{dim} features (model.vision_dim)")
    if len(saved.labels) != m.n_labels:
        raise ConfigError(f"{where}: field 'labels' has {len(saved.labels)} names ({', '.join(saved.labels[:3])}, "
                          f"...), but model.n_labels={m.n_labels}")
    if vision is None:
        raise ConfigError(f"{where}: the classifier is checked against the volume encoder, and none was given")
    digest = module_digest(vision)
    if saved.encoder_sha256 != digest:
        raise ConfigError(f"{where}: field 'encoder_sha256' ({saved.encoder_sha256[:12]}...) is not this run's "
                          f"volume encoder ({digest[:12]}...): the classifier was trained on another encoder's "
                          "features; train it with this run's model.vision_*, patch_size, volume size and seed")
    with torch.no_grad():
        head.weight.copy_(saved.head.weight)
        head.bias.copy_(saved.head.bias)
    log(f"trained, from {describe(saved)}")
    return head
