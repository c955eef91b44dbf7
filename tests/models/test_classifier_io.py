"""RAD3D-Prefix's classifier files (mrgfast.models.classifier_io): round trip, the encoder fingerprint, and errors
that name the file and the field or tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mrgfast.models.classifier_io import (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, load_classifier, module_digest,
                                          save_classifier)

LABELS = ["Cardiomegaly", "Emphysema", "Lung nodule"]


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    save_classifier(head, tmp_path, LABELS, "ab" * 32, val={"macro_auroc": 0.9, "macro_f1": 0.7})
    return head, tmp_path


def test_round_trip_by_directory_or_weights_file(saved):
    head, directory = saved
    for path in (directory, directory / CLASSIFIER_WEIGHTS):
        loaded = load_classifier(path)
        assert torch.equal(loaded.head.weight, head.weight) and torch.equal(loaded.head.bias, head.bias)
        assert (loaded.input_dim, loaded.labels, loaded.encoder_sha256) == (5, LABELS, "ab" * 32)
        assert not any(p.requires_grad for p in loaded.head.parameters()) and not loaded.head.training
    assert json.loads((directory / CLASSIFIER_CONFIG).read_text())["val"]["macro_auroc"] == 0.9


def test_digest_follows_every_weight():
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    first = module_digest(module)
    assert module_digest(module) == first and len(first) == 64
    with torch.no_grad():
        module[1].bias[2] += 1e-7
    assert module_digest(module) != first


def edit_config(directory, **changes):
    config = json.loads((directory / CLASSIFIER_CONFIG).read_text())
    config.update(changes)
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "other"}, r"field 'model_type' must be 'mrgfast_diagnostic_classifier'"),
    ({"input_dim": "5"}, r"field 'input_dim' must be an integer >= 1"),
    ({"input_dim": 0}, r"field 'input_dim' must be an integer >= 1"),
    ({"labels": ["a", "a", "b"]}, r"field 'labels' must be a non-empty list of distinct names"),
    ({"encoder_sha256": None}, r"field 'encoder_sha256'"),
    ({"input_dim": 6}, r"tensor 'weight' has shape \(3, 5\), but classifier.json says \(3, 6\)"),
    ({"labels": ["a", "b"]}, r"tensor 'weight' has shape \(3, 5\), but classifier.json says \(2, 5\)"),
])
def test_bad_config_fields_are_named(saved, changes, message):
    _, directory = saved
    edit_config(directory, **changes)
    with pytest.raises(ValueError, match=message) as caught:
        load_classifier(directory)
    assert str(directory) in str(caught.value)


def test_bad_or_missing_files_are_named(saved, tmp_path_factory):
    _, directory = saved
    tensors = load_file(str(directory / CLASSIFIER_WEIGHTS))
    save_file({**tensors, "extra": torch.zeros(1)}, str(directory / CLASSIFIER_WEIGHTS))
    with pytest.raises(ValueError, match=r"classifier.safetensors: expected the tensors \['bias', 'weight'\], got "
                                         r"\['bias', 'extra', 'weight'\] \(3 in all\)"):
        load_classifier(directory)
    save_file({**tensors, "weight": torch.full((3, 5), float("nan"))}, str(directory / CLASSIFIER_WEIGHTS))
    with pytest.raises(ValueError, match="tensor 'weight' must hold finite"):
        load_classifier(directory)
    (directory / CLASSIFIER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_classifier(directory)
    (directory / CLASSIFIER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="classifier.safetensors not found"):
        load_classifier(directory)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="classifier.json not found: expected a classifier directory"):
        load_classifier(empty)
    (empty / CLASSIFIER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="classifier.json: not a JSON file"):
        load_classifier(empty)


def test_label_count_must_match_the_head(tmp_path):
    with pytest.raises(ValueError, match="the head has 3 outputs for 2 labels"):
        save_classifier(nn.Linear(4, 3), tmp_path, ["a", "b"], "0" * 64)
