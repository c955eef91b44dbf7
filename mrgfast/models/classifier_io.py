"""RAD3D-Prefix's diagnostic classifier on disk: classifier.safetensors (a linear head's weight and bias) and
classifier.json (its input width, label names and the fingerprint of the frozen encoder it was trained on)."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mrgfast.common.files import atomic_write, atomic_write_text

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"
MODEL_TYPE = "mrgfast_diagnostic_classifier"
TENSORS = ("bias", "weight")


@dataclass
class SavedClassifier:
    """A classifier read from disk: the head (frozen, eval mode), its config fields and where they came from."""

    head: nn.Linear
    input_dim: int
    labels: list
    encoder_sha256: str
    config: dict
    config_file: Path


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes, in name order): which frozen encoder this is."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def save_classifier(head: nn.Linear, out_dir: Union[str, Path], labels, encoder_sha256: str, **extra) -> Path:
    """Write `head` as classifier.safetensors + classifier.json (atomically, each) in `out_dir`; returns out_dir."""
    labels = list(labels)
    if head.out_features != len(labels):
        raise ValueError(f"save_classifier: the head has {head.out_features} outputs for {len(labels)} labels")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}
    with atomic_write(out_dir / CLASSIFIER_WEIGHTS, fsync=True) as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "input_dim": head.in_features, "labels": labels,
              "encoder_sha256": encoder_sha256, **extra}
    atomic_write_text(out_dir / CLASSIFIER_CONFIG, json.dumps(config, indent=1) + "\n", fsync=True)
    return out_dir


def classifier_files(path: Union[str, Path]) -> tuple:
    """(weights file, config file) of a classifier directory, or of its classifier.safetensors named directly."""
    path = Path(path)
    directory = path.parent if path.name == CLASSIFIER_WEIGHTS else path
    return directory / CLASSIFIER_WEIGHTS, directory / CLASSIFIER_CONFIG


def _field(config: dict, name: str, kind, where: Path, expected: str):
    """config[name] when it is a `kind`, else ValueError naming the file, the field and what was expected."""
    value = config.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be {expected}, got {value!r:.80}")
    return value


def read_classifier_config(config_file: Path) -> dict:
    """classifier.json, checked: model_type, input_dim (int >= 1), labels (distinct names), encoder_sha256."""
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: expected a classifier directory written by "
                                "`python -m mrgfast.train config=configs/rad3d_classifier.yaml` (mode=classify)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file}: not a JSON file ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_file}: field 'model_type' must be {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    if _field(config, "input_dim", int, config_file, "an integer >= 1") < 1:
        raise ValueError(f"{config_file}: field 'input_dim' must be an integer >= 1, got {config['input_dim']}")
    labels = _field(config, "labels", list, config_file, "a list of label names")
    if not labels or not all(isinstance(n, str) for n in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"{config_file}: field 'labels' must be a non-empty list of distinct names, got "
                         f"{labels!r:.80}")
    _field(config, "encoder_sha256", str, config_file, "the sha256 of the encoder's weights")
    return config


def load_classifier(path: Union[str, Path]) -> SavedClassifier:
    """The classifier a save_classifier directory (or its classifier.safetensors) holds; errors name the file and
    the field or tensor that is wrong."""
    weights_file, config_file = classifier_files(path)
    config = read_classifier_config(config_file)
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found (beside {config_file.name})")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({err})") from None
    if tuple(sorted(tensors)) != TENSORS:
        raise ValueError(f"{weights_file}: expected the tensors {list(TENSORS)}, got {sorted(tensors)[:5]} "
                         f"({len(tensors)} in all)")
    n_labels, input_dim = len(config["labels"]), config["input_dim"]
    expected = {"weight": (n_labels, input_dim), "bias": (n_labels,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but "
                             f"{config_file.name} says {shape} (labels x input_dim)")
        if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{weights_file}: tensor {name!r} must hold finite floating-point values")
    head = torch.nn.utils.skip_init(nn.Linear, input_dim, n_labels)  # no init: loading draws nothing from the RNG
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return SavedClassifier(head.eval().requires_grad_(False), input_dim, list(config["labels"]),
                           config["encoder_sha256"], config, config_file)


def describe(saved: SavedClassifier, extra: Optional[str] = None) -> str:
    """One line about a loaded classifier for logs: file, labels, and its validation figures when recorded."""
    val = saved.config.get("val") or {}
    figures = ", ".join(f"{k} {val[k]:.4f}" for k in ("macro_auroc", "macro_f1") if isinstance(val.get(k), float))
    return (f"{saved.config_file.parent} ({saved.input_dim} -> {len(saved.labels)} labels"
            + (f"; val {figures}" if figures else "") + (f"; {extra}" if extra else "") + ")")
