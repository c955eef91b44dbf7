"""AUROC and F1 (mrgfast.metrics.classification) against sklearn when installed, and against brute force always."""

import itertools

import numpy as np
import pytest

from mrgfast.metrics import auroc, binary_f1, multilabel_metrics


def pairwise_auroc(scores, targets) -> float:
    """The definition: over every (positive, negative) pair, 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, t in zip(scores, targets) if t == 1]
    neg = [s for s, t in zip(scores, targets) if t == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


CASES = [(n, ties, seed) for n, ties in ((2, False), (7, False), (31, True), (64, True), (257, False))
         for seed in range(3)]


@pytest.mark.parametrize("n,ties,seed", CASES)
def test_auroc_equals_the_pairwise_definition(n, ties, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, n)
    targets[0], targets[-1] = 0, 1  # both classes
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n) + targets
    assert auroc(scores, targets) == pytest.approx(pairwise_auroc(scores, targets), abs=1e-12)


@pytest.mark.parametrize("n,ties,seed", CASES)
def test_auroc_and_f1_equal_sklearn(n, ties, seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(100 + seed)
    targets = rng.integers(0, 2, n)
    targets[0], targets[-1] = 0, 1
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n) + targets
    assert auroc(scores, targets) == pytest.approx(metrics.roc_auc_score(targets, scores), abs=1e-12)
    predicted = (scores > np.median(scores)).astype(float)
    assert binary_f1(predicted, targets)["f1"] == pytest.approx(metrics.f1_score(targets, predicted), abs=1e-12)


def test_perfect_reversed_and_constant_scores():
    assert auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auroc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_one_class_has_no_auroc_and_undefined_ratios_are_none():
    assert auroc([0.1, 0.4], [0, 0]) is None and auroc([0.3], [1]) is None
    assert binary_f1([0.0, 0.0], [0, 0]) == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert binary_f1([1.0, 0.0], [0, 0])["f1"] == 0.0


def test_bad_inputs_say_what_was_wrong():
    with pytest.raises(ValueError, match="one length"):
        auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match=r"targets must be 0 or 1, got \[2\]"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match=r"\[N, 2 labels\]"):
        multilabel_metrics(np.zeros((3, 3)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 2)), ["a", "b"], threshold=1.0)


def test_multilabel_macro_leaves_out_single_class_labels_and_uncertain_targets():
    logits = np.array([[2.0, -1.0, 0.3], [-2.0, -1.0, 0.1], [1.0, -3.0, -0.2], [-0.5, -2.0, 0.0]])
    targets = np.array([[1, 0, 1], [0, 0, -1], [1, 0, 0], [0, 0, 1]])
    out = multilabel_metrics(logits, targets, ["a", "never", "c"])
    assert out["single_class"] == ["never"] and out["macro_over"] == ["a", "c"]
    assert out["labels"]["never"]["auroc"] is None
    assert out["labels"]["a"]["auroc"] == 1.0 and out["labels"]["a"]["f1"] == 1.0
    # "c" scores the three samples with a known target: 0.3 (1), -0.2 (0), 0.0 (1); threshold 0.5 <=> logit >= 0.
    assert out["labels"]["c"]["n"] == 3 and out["labels"]["c"]["auroc"] == pytest.approx(1.0)
    assert out["labels"]["c"]["f1"] == pytest.approx(1.0)
    assert out["macro_auroc"] == pytest.approx(1.0) and out["macro_f1"] == pytest.approx(1.0)
    shifted = multilabel_metrics(logits, targets, ["a", "never", "c"], threshold=0.6)  # cut at logit 0.405
    assert shifted["labels"]["c"]["f1"] == pytest.approx(0.0) and shifted["macro_f1"] == pytest.approx(0.5)
    assert multilabel_metrics(logits, np.zeros_like(targets), ["a", "b", "c"])["macro_auroc"] is None
