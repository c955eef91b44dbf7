"""format_table: one column per run, one row per metric, readable at a glance."""

import pytest

from mrgfast.metrics import flatten_metrics, format_table

RESULTS = {
    "untrained": {"BLEU_4": 0.012345, "METEOR": 0.05, "clinical": {"macro_f1": 0.1, "n_reports": 590,
                                                                   "per_finding": {"A": {"f1": 0.2}}},
                  "hallucination": {"rate": 0.61, "per_report": [0.5, 1.0]}},
    "sft": {"BLEU_4": 0.31, "METEOR": 0.4, "clinical": {"macro_f1": 0.72, "n_reports": 590,
                                                        "per_finding": {"A": {"f1": 0.8}}},
            "hallucination": {"rate": 0.2, "per_report": [0.0, 0.5]}},
    "dpo": {"BLEU_4": 0.3, "clinical": {"macro_f1": 0.74, "n_reports": 590, "per_finding": {"A": {"f1": 0.9}}},
            "hallucination": {"rate": 0.1, "per_report": [0.0, 0.0]}, "vqa": {"open": None}},
}


def parse(table: str) -> tuple:
    """(header cells, {metric: cells}) of a format_table string."""
    lines = table.splitlines()
    assert set(lines[1]) == {"-"}
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    return lines[0].split(), rows


def test_runs_are_columns_and_metrics_rows():
    header, rows = parse(format_table(RESULTS))
    assert header == ["metric", "untrained", "sft", "dpo"]
    assert list(rows) == ["BLEU_4", "METEOR", "clinical/macro_f1", "clinical/n_reports", "hallucination/rate",
                          "vqa/open"]
    assert rows["BLEU_4"] == ["0.0123", "0.3100", "0.3000"]
    assert rows["METEOR"] == ["0.0500", "0.4000", "-"]          # dpo has no METEOR
    assert rows["clinical/n_reports"] == ["590", "590", "590"]  # counts stay whole numbers
    assert rows["vqa/open"] == ["-", "-", "-"]                  # None (no questions of a kind) shows as '-'


def test_columns_line_up():
    lines = format_table(RESULTS).splitlines()
    assert len({len(line) for line in lines}) == 1  # numbers are right-aligned to one width per column


def test_explicit_metrics_pick_rows_at_any_depth():
    header, rows = parse(format_table(RESULTS, metrics=["hallucination/rate", "clinical/per_finding/A/f1"]))
    assert list(rows) == ["hallucination/rate", "clinical/per_finding/A/f1"]
    assert rows["clinical/per_finding/A/f1"] == ["0.2000", "0.8000", "0.9000"]
    with pytest.raises(ValueError, match=r"\['BLEU_9'\] are in no run's results"):
        format_table(RESULTS, metrics=["BLEU_9"])


def test_flatten_metrics_depth_and_types():
    nested = {"a": 1, "b": {"c": 0.5, "d": {"e": 2}, "l": [1, 2], "s": "text", "t": True}, "n": None}
    assert flatten_metrics(nested) == {"a": 1, "b/c": 0.5, "b/d/e": 2, "n": None}
    assert flatten_metrics(nested, max_depth=2) == {"a": 1, "b/c": 0.5, "n": None}
    assert flatten_metrics(nested, max_depth=1) == {"a": 1, "n": None}


def test_bad_results_raise():
    with pytest.raises(ValueError, match="non-empty dict"):
        format_table({})
    with pytest.raises(TypeError, match=r"results\['sft'\] must be a dict"):
        format_table({"sft": [0.1]})
