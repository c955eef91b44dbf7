"""Clinical efficacy of generated reports: finding precision/recall/F1 and the hallucination rate from labels.

Labels are per-report dicts finding -> 1 (positive), 0 (negative), -1 (uncertain) or None/NaN (not mentioned), as
the CheXpert labeler writes them for the reference and for the generated report. Following the clinical-efficacy
convention for MIMIC-CXR, only 1 counts as positive: uncertain, negative and missing all count as negative.
"""

import math
from typing import Mapping, Optional, Sequence

_VALID = "1, 0, -1, None or NaN"


def _is_positive(value, where: str) -> bool:
    """Whether one label is positive (exactly 1); a value that is no CheXpert label raises naming `where`."""
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be {_VALID}, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float) and math.isnan(value):
        return False
    if value not in (1, 0, -1):
        raise ValueError(f"{where} must be {_VALID}, got {value!r}")
    return value == 1


def _checked_reports(labels: Sequence[Mapping], name: str) -> list:
    """`labels` as a list of dicts; anything else raises naming the argument and the report index."""
    if isinstance(labels, (str, Mapping)) or not isinstance(labels, Sequence):
        raise TypeError(f"{name} must be a sequence of dicts finding -> label (one per report), "
                        f"got {type(labels).__name__}")
    for index, report in enumerate(labels):
        if not isinstance(report, Mapping):
            raise TypeError(f"{name}[{index}] must be a dict finding -> label, got {type(report).__name__}")
    return list(labels)


def _positives(reference_labels, generated_labels, findings: Optional[Sequence[str]]) -> tuple:
    """(findings, reference positive sets, generated positive sets), after validating every label."""
    refs = _checked_reports(reference_labels, "reference_labels")
    gens = _checked_reports(generated_labels, "generated_labels")
    if len(refs) != len(gens):
        raise ValueError(f"reference_labels and generated_labels must pair up one to one, got {len(refs)} "
                         f"reference and {len(gens)} generated reports")
    if not refs:
        raise ValueError("clinical metrics need at least one (reference, generated) report pair, got none")
    if findings is None:
        # Every finding either side names, sorted so the result does not depend on dict order.
        findings = sorted({finding for report in refs + gens for finding in report})
    else:
        if isinstance(findings, str) or not all(isinstance(f, str) for f in findings):
            raise TypeError(f"findings must be a sequence of finding names or None, got {findings!r:.80}")
        findings = list(findings)
        if len(set(findings)) != len(findings):
            raise ValueError(f"findings must not repeat a name, got {findings}")
    if not findings:
        raise ValueError("no findings to score: the label dicts are all empty and `findings` was not given")
    chosen = set(findings)

    def positive_sets(reports, name):
        sets = []
        for index, report in enumerate(reports):
            # Only the scored findings are checked: other keys (a labeler's 'Reports' column, say) are not labels.
            sets.append({finding for finding, value in report.items()
                         if finding in chosen and _is_positive(value, f"{name}[{index}][{finding!r}]")})
        return sets

    return findings, positive_sets(refs, "reference_labels"), positive_sets(gens, "generated_labels")


def _prf(tp: int, fp: int, fn: int) -> tuple:
    """(precision, recall, F1), each 0.0 where its denominator is 0 (sklearn's zero_division=0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # equals 2PR/(P+R); 0 whenever tp is 0
    return precision, recall, f1


def clinical_metrics(reference_labels: Sequence[Mapping], generated_labels: Sequence[Mapping],
                     findings: Optional[Sequence[str]] = None) -> dict:
    """Micro and macro precision/recall/F1 of the generated reports' positive findings against the references'.

    Each (report, finding) is one binary decision, positive only where the label is 1. `findings` chooses the
    findings scored (a finding missing from a dict counts as negative); by default, every finding any dict names.
    Micro pools TP/FP/FN over all findings; macro is the unweighted mean of the per-finding scores over *all*
    scored findings. As with sklearn's zero_division=0, a score whose denominator is 0 is 0: a finding no reference
    and no generated report has as positive adds 0 to the macro means (it lowers them; pass `findings` to leave it
    out), and `per_finding[...]["support"]` (reference positives) shows which findings these are. Keys:
    micro_precision, micro_recall, micro_f1, macro_precision, macro_recall, macro_f1, n_reports, n_findings,
    per_finding (finding -> precision, recall, f1, support, tp, fp, fn).
    """
    findings, ref_sets, gen_sets = _positives(reference_labels, generated_labels, findings)
    per_finding = {}
    totals = [0, 0, 0]
    for finding in findings:
        tp = sum(finding in ref and finding in gen for ref, gen in zip(ref_sets, gen_sets))
        fp = sum(finding not in ref and finding in gen for ref, gen in zip(ref_sets, gen_sets))
        fn = sum(finding in ref and finding not in gen for ref, gen in zip(ref_sets, gen_sets))
        precision, recall, f1 = _prf(tp, fp, fn)
        per_finding[finding] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn,
                                "tp": tp, "fp": fp, "fn": fn}
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    micro = _prf(*totals)
    result = {"micro_precision": micro[0], "micro_recall": micro[1], "micro_f1": micro[2]}
    for key in ("precision", "recall", "f1"):
        result[f"macro_{key}"] = sum(scores[key] for scores in per_finding.values()) / len(findings)
    result.update(n_reports=len(ref_sets), n_findings=len(findings), per_finding=per_finding)
    return result


def hallucination_rate(reference_labels: Sequence[Mapping], generated_labels: Sequence[Mapping],
                       findings: Optional[Sequence[str]] = None) -> dict:
    """How often a generated report asserts a finding (label 1) that its reference does not have (label not 1).

    - rate: hallucinated / asserted over the whole set, where asserted counts (report, finding) pairs positive in
      the generated report and hallucinated those of them not positive in the reference (= 1 - micro precision);
      0.0 when nothing is asserted at all.
    - per_report: that fraction for each report (0.0 for a report asserting nothing); mean_per_report: its mean.
    - reports_with_hallucination: fraction of reports asserting at least one finding their reference lacks.
    - hallucinated, asserted: the pooled counts.
    `findings` chooses the findings counted as in `clinical_metrics` (e.g. leave out 'No Finding', which asserts
    an absence); by default every finding any dict names.
    """
    _, ref_sets, gen_sets = _positives(reference_labels, generated_labels, findings)
    hallucinated = [len(gen - ref) for ref, gen in zip(ref_sets, gen_sets)]
    asserted = [len(gen) for gen in gen_sets]
    per_report = [h / a if a else 0.0 for h, a in zip(hallucinated, asserted)]
    return {
        "rate": sum(hallucinated) / sum(asserted) if sum(asserted) else 0.0,
        "mean_per_report": sum(per_report) / len(per_report),
        "reports_with_hallucination": sum(h > 0 for h in hallucinated) / len(hallucinated),
        "hallucinated": sum(hallucinated),
        "asserted": sum(asserted),
        "per_report": per_report,
    }
