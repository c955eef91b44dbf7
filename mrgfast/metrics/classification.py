"""Multi-label classification metrics: per-label AUROC and F1 and their macro averages (RAD3D's classifier).

AUROC is the Mann-Whitney statistic: the probability that a random positive scores above a random negative, ties
counting one half (what sklearn.metrics.roc_auc_score computes), from average ranks in O(n log n). A label with only
one class among the scored samples has no AUROC (None) and is left out of both macro averages; it is listed under
"single_class" so the averages' denominators are plain. Targets of -1 (CT-RATE's uncertain) are left out per label.
"""

from typing import Optional, Sequence

import numpy as np


def _checked(scores, targets) -> tuple:
    """(scores, targets) as 1-D float / int arrays of one length, targets in {0, 1}; errors say what was wrong."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 1 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets must be 1-D of one length, got shapes {scores.shape} and "
                         f"{targets.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    bad = ~np.isin(targets, (0, 1))
    if bad.any():
        raise ValueError(f"targets must be 0 or 1, got {targets[bad][:3].tolist()} ({int(bad.sum())} such)")
    return scores, targets.astype(np.int64)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Runs of equal values: each gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores, targets) -> Optional[float]:
    """Area under the ROC curve of `scores` for binary `targets`; None when the targets hold only one class."""
    scores, targets = _checked(scores, targets)
    positives = int(targets.sum())
    negatives = len(targets) - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = _average_ranks(scores)
    # Mann-Whitney U of the positives over the negatives, normalised by the number of pairs.
    u = ranks[targets == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def binary_f1(predicted, targets) -> dict:
    """{"precision", "recall", "f1", "support"} of 0/1 predictions; a 0/0 ratio is None (undefined), not 0."""
    predicted, targets = _checked(predicted, targets)
    if not np.isin(predicted, (0.0, 1.0)).all():
        raise ValueError("predictions must be 0 or 1")
    tp = int(((predicted == 1) & (targets == 1)).sum())
    fp = int(((predicted == 1) & (targets == 0)).sum())
    fn = int(((predicted == 0) & (targets == 1)).sum())
    ratio = lambda num, den: num / den if den else None  # noqa: E731 - a local shorthand
    return {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "support": tp + fn}


def multilabel_metrics(logits, targets, labels: Sequence[str], threshold: float = 0.5) -> dict:
    """Per-label AUROC and F1 (predicted positive where sigmoid(logit) >= threshold) of [N, L] logits against [N, L]
    targets in {1, 0, -1} (-1: uncertain, left out), and their macro averages over the labels with both classes."""
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    labels = list(labels)
    if logits.ndim != 2 or targets.shape != logits.shape or logits.shape[1] != len(labels):
        raise ValueError(f"logits and targets must both be [N, {len(labels)} labels], got {logits.shape} and "
                         f"{targets.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    cut = float(np.log(threshold / (1.0 - threshold)))  # sigmoid(x) >= t  <=>  x >= logit(t)
    per_label, single_class = {}, []
    for j, name in enumerate(labels):
        known = targets[:, j] != -1
        score, target = logits[known, j], targets[known, j]
        area = auroc(score, target)
        entry = {"auroc": area, **binary_f1((score >= cut).astype(np.float64), target),
                 "positives": int((target == 1).sum()), "n": int(known.sum())}
        per_label[name] = entry
        if area is None:
            single_class.append(name)
    scored = [name for name in labels if name not in single_class]
    # A scored label has a positive, so its F1's denominator (2 tp + fp + fn >= positives) is never 0.
    macro = lambda key: float(np.mean([per_label[n][key] for n in scored])) if scored else None  # noqa: E731
    return {"labels": per_label, "macro_auroc": macro("auroc"), "macro_f1": macro("f1"),
            "macro_over": scored, "single_class": single_class, "threshold": threshold, "n_samples": len(logits)}
