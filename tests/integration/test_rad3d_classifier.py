"""RAD3D-Prefix's classifier stage trains for real on the synthetic twin (100 volumes of 8^3, the recipe's
encoder): val macro AUROC >= 0.8 over the labels with both classes; then a prefix run loads it."""

import json

import pytest

from mrgfast.config import load_config
from mrgfast.train import train
from tests.tiny_run import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_classifier_reaches_macro_auroc_08_and_the_prefix_run_loads_it(tmp_path_factory, tmp_path):
    cache = tmp_path_factory.mktemp("rad3d-classifier-cache")
    common = [f"data.cache_dir={cache}", "data.synthetic_n=3", "telemetry.progress_bar=false",
              "telemetry.tensorboard=false"]
    classify = train(load_config(CONFIGS / "rad3d_classifier.yaml", common + [f"output_dir={tmp_path / 'cls'}"]))
    scores = json.loads((tmp_path / "cls" / "eval-step-000300.json").read_text())["classifier"]
    assert scores["n_samples"] == 20 and len(scores["macro_over"]) >= 3, scores["macro_over"]
    assert scores["macro_auroc"] >= 0.8, {n: scores["labels"][n]["auroc"] for n in scores["macro_over"]}
    assert classify.evaluations[0]["classifier/macro_auroc"] == scores["macro_auroc"]
    prefix = train(load_config(CONFIGS / "rad3d_prefix.yaml", common + [
        f"output_dir={tmp_path / 'prefix'}", f"model.classifier_from={tmp_path / 'cls'}", "model.mapper_layers=1",
        "schedule.max_steps=2", "schedule.warmup_ratio=0", "checkpoint.every_steps=100", "resume=none"]))
    assert prefix.step == 2
