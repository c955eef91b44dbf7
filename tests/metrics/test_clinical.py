"""Clinical efficacy (finding P/R/F1) and hallucination rate: a hand-worked example and sklearn as the oracle."""

import math

import numpy as np
import pytest

from mrgfast.metrics import clinical_metrics, hallucination_rate

NAN = math.nan
# Positives (label 1 only): reference {A}, {A,B}, {C}, {B}; generated {A,B}, {B,C}, {C}, {A,C}.
REFERENCE = [
    {"A": 1, "B": 0, "C": -1},     # uncertain C counts as negative
    {"A": 1, "B": 1},              # missing C counts as negative
    {"A": 0, "B": None, "C": 1},
    {"A": NAN, "B": 1, "C": 0},
]
GENERATED = [
    {"A": 1, "B": 1, "C": 0},
    {"A": 0, "B": 1, "C": 1},
    {"A": -1, "C": 1.0},
    {"A": 1, "B": 0, "C": 1},
]


def test_hand_computed_example():
    result = clinical_metrics(REFERENCE, GENERATED)
    # A: tp 1 (r0), fp 1 (r3), fn 1 (r1). B: tp 1 (r1), fp 1 (r0), fn 1 (r3). C: tp 1 (r2), fp 2 (r1, r3), fn 0.
    assert result["per_finding"] == {
        "A": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "tp": 1, "fp": 1, "fn": 1},
        "B": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "tp": 1, "fp": 1, "fn": 1},
        "C": {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1, "tp": 1, "fp": 2, "fn": 0},
    }
    # micro: tp 3, fp 4, fn 2.
    assert result["micro_precision"] == pytest.approx(3 / 7)
    assert result["micro_recall"] == pytest.approx(3 / 5)
    assert result["micro_f1"] == pytest.approx(6 / 12)
    assert result["macro_precision"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert result["macro_recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert result["macro_f1"] == pytest.approx(0.5)
    assert result["n_reports"] == 4 and result["n_findings"] == 3


def test_finding_without_positives_adds_zero_to_macro():
    result = clinical_metrics(REFERENCE, GENERATED, findings=["A", "B", "C", "D"])
    assert result["per_finding"]["D"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0,
                                          "tp": 0, "fp": 0, "fn": 0}
    assert result["macro_f1"] == pytest.approx(0.5 * 3 / 4)
    assert result["micro_f1"] == clinical_metrics(REFERENCE, GENERATED)["micro_f1"]


def test_findings_selects_and_orders():
    result = clinical_metrics(REFERENCE, GENERATED, findings=["C", "A"])
    assert list(result["per_finding"]) == ["C", "A"]
    assert result["macro_f1"] == pytest.approx(0.5) and result["micro_precision"] == pytest.approx(2 / 5)
    # Keys outside `findings` are not labels and are not checked (e.g. a labeler's text column).
    with_text = [dict(report, Reports="free text") for report in REFERENCE]
    assert clinical_metrics(with_text, GENERATED, findings=["C", "A"]) == result


def binarised(reports, findings) -> np.ndarray:
    """[reports, findings] 0/1 matrix with only 1 positive: the usual CheXpert clinical-efficacy preprocessing."""
    return np.array([[1 if report.get(f) == 1 else 0 for f in findings] for report in reports])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    import sklearn.metrics as sklearn_metrics
    rng = np.random.default_rng(seed)
    findings = [f"finding_{i}" for i in range(7)]
    values = [1, 0, -1, None, NAN]

    def random_reports(n):
        # Finding 6 is never positive, so the zero_division convention is exercised too.
        return [{f: values[rng.integers(1, 5) if i == 6 else rng.integers(0, 5)] for i, f in enumerate(findings)
                 if rng.random() > 0.2} for _ in range(n)]

    refs, gens = random_reports(23), random_reports(23)
    result = clinical_metrics(refs, gens, findings=findings)
    truth, pred = binarised(refs, findings), binarised(gens, findings)
    for average in ("micro", "macro"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(truth, pred, average=average, zero_division=0)
        assert result[f"{average}_precision"] == pytest.approx(p, abs=1e-12)
        assert result[f"{average}_recall"] == pytest.approx(r, abs=1e-12)
        assert result[f"{average}_f1"] == pytest.approx(f, abs=1e-12)
    p, r, f, support = sklearn_metrics.precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
    for i, finding in enumerate(findings):
        scores = result["per_finding"][finding]
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert scores["support"] == support[i]
    # Pooled hallucination rate is 1 - micro precision.
    assert hallucination_rate(refs, gens, findings)["rate"] == pytest.approx(1 - result["micro_precision"])


def test_hallucination_rate_hand_computed():
    result = hallucination_rate(REFERENCE, GENERATED)
    # Report 0 asserts {A,B}, reference {A}: B hallucinated (1/2). Report 1: C (1/2). Report 2: none (0/1).
    # Report 3 asserts {A,C}, reference {B}: both (2/2).
    assert result["per_report"] == [0.5, 0.5, 0.0, 1.0]
    assert result["hallucinated"] == 4 and result["asserted"] == 7
    assert result["rate"] == pytest.approx(4 / 7)
    assert result["mean_per_report"] == pytest.approx(0.5)
    assert result["reports_with_hallucination"] == pytest.approx(3 / 4)


def test_hallucination_rate_nothing_asserted_is_zero():
    result = hallucination_rate([{"A": 1}, {"A": 0}], [{"A": 0}, {"A": -1}])
    assert result == {"rate": 0.0, "mean_per_report": 0.0, "reports_with_hallucination": 0.0,
                      "hallucinated": 0, "asserted": 0, "per_report": [0.0, 0.0]}


def test_bad_inputs_raise_naming_report_and_finding():
    with pytest.raises(ValueError, match=r"generated_labels\[1\]\['B'\] must be 1, 0, -1, None or NaN, got 2"):
        clinical_metrics([{"B": 1}, {"B": 1}], [{"B": 1}, {"B": 2}])
    with pytest.raises(ValueError, match=r"reference_labels\[0\]\['B'\] must be .* got str 'yes'"):
        hallucination_rate([{"B": "yes"}], [{"B": 1}])
    with pytest.raises(ValueError, match=r"reference_labels\[0\]\['B'\] must be .* got bool"):
        clinical_metrics([{"B": True}], [{"B": 1}])
    with pytest.raises(ValueError, match="2 reference and 1 generated"):
        clinical_metrics([{}, {}], [{}])
    with pytest.raises(ValueError, match="at least one"):
        clinical_metrics([], [])
    with pytest.raises(ValueError, match="no findings to score"):
        clinical_metrics([{}], [{}])
    with pytest.raises(ValueError, match="must not repeat"):
        clinical_metrics([{"A": 1}], [{"A": 1}], findings=["A", "A"])
    with pytest.raises(TypeError, match=r"generated_labels\[0\] must be a dict"):
        clinical_metrics([{"A": 1}], [[1]])
    with pytest.raises(TypeError, match="reference_labels must be a sequence of dicts"):
        clinical_metrics({"A": 1}, [{"A": 1}])
