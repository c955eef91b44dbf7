"""RAD3D-Prefix's classify stage (mode=classify, mrgfast.train.classify): the loss, the folded standardization, and
a tiny run through train() and what it writes. (That it reaches val macro AUROC >= 0.8:
tests/integration/test_rad3d_classifier.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F

from mrgfast.config import ConfigError, load_config
from mrgfast.models.classifier_io import load_classifier
from mrgfast.train import train
from mrgfast.train.classify import bce_loss, fold_standardizer, standardizer
from tests.tiny_run import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classify(cache, out, *extra):
    return load_config(CONFIGS / "rad3d_classifier.yaml", [
        f"output_dir={out}", f"data.cache_dir={cache}", "data.synthetic_n=3", "data.synthetic_volumes=10",
        "schedule.max_steps=5", "telemetry.log_every=2", "telemetry.progress_bar=false", *extra])


def test_bce_leaves_out_uncertain_targets():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    known = targets != -1
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.allclose(bce_loss(logits, targets), expected, atol=1e-7)
    grad, = torch.autograd.grad(bce_loss(logits, targets), logits)
    assert torch.all(grad[~known] == 0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_the_folded_head_on_raw_features_equals_the_head_on_standardized_ones(dtype, atol):
    torch.manual_seed(0)
    x = (torch.randn(37, 7, dtype=dtype) * 0.03 + 0.7)
    mean, std = standardizer(x)
    head = torch.nn.Linear(7, 5).to(dtype)
    folded = fold_standardizer(head, mean, std)
    assert torch.allclose(folded(x), head((x - mean) / std), atol=atol)
    assert not any(p.requires_grad for p in folded.parameters())


def test_a_classify_run_writes_the_classifier_and_its_val_metrics(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.mktemp("classify-cache")
    result = train(tiny_classify(cache, tmp_path))
    assert result.step == 5 and result.checkpoint == tmp_path
    assert [r["step"] for r in result.history] == [2, 4, 5] and all("loss" in r for r in result.history)
    saved = load_classifier(tmp_path)
    assert saved.input_dim == 32 and len(saved.labels) == 18 and saved.labels[2] == "Cardiomegaly"
    assert torch.equal(saved.head.weight, result.model.weight.cpu())
    scores = json.loads((tmp_path / "eval-step-000005.json").read_text())["classifier"]
    assert set(scores["labels"]) == set(saved.labels) and scores["threshold"] == 0.5
    # Only the synthetic twin's four findings can have both classes in val; the rest are left out, by name.
    assert set(scores["macro_over"]) <= {"Cardiomegaly", "Emphysema", "Lung nodule", "Pleural effusion"}
    assert len(scores["macro_over"]) + len(scores["single_class"]) == 18
    for name in scores["macro_over"]:
        assert 0.0 <= scores["labels"][name]["auroc"] <= 1.0 and scores["labels"][name]["f1"] is not None
    line = json.loads((tmp_path / "eval.jsonl").read_text())
    assert line["step"] == 5 and line["classifier/macro_auroc"] == scores["macro_auroc"]
    assert result.evaluations == [{"step": 5, "classifier/macro_auroc": scores["macro_auroc"],
                                   "classifier/macro_f1": scores["macro_f1"]}]
    assert (tmp_path / "config.yaml").is_file()
    # A rerun into the same directory replaces the logs rather than appending to them.
    train(tiny_classify(cache, tmp_path))
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["resume=runs/x/step-000010"], "mode=classify trains in one go and writes no step checkpoints"),
    (["model.recipe=demo"], "needs model.recipe=rad3d_prefix"),
    (["model.classifier=random"], "leave model.classifier_from and model.classifier unset"),
    (["data.dataset=iu_xray", "data.path=x.json"], "needs labelled CT volumes"),
    (["data.dataset=ct_rate", "data.path=x.csv"], "needs data.labels_path, classify.val_path"),
    (["eval.at_end=true"], "scores its validation split itself"),
    (["classify.threshold=1.5"], "config section 'classify': threshold must be in"),
])
def test_bad_classify_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_classify(tmp_path, tmp_path, *extra)


def test_label_count_must_be_the_models(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.mktemp("classify-cache")
    with pytest.raises(ConfigError, match=r"model.n_labels=4, but .* has 18 label columns \(Medical material, "):
        train(tiny_classify(cache, tmp_path, "model.n_labels=4"))
