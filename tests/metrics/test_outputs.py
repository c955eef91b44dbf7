"""eval.json and the per-sample generations JSONL: content, strict JSON, and atomic replacement."""

import json
import os

import numpy as np
import pytest

from mrgfast.metrics import write_eval_json, write_generations


def test_eval_json_round_trips(tmp_path):
    metrics = {"report": {"BLEU_4": 0.25, "CIDEr": np.float64(1.5)}, "vqa": {"open": None, "n_open": np.int64(0)},
               "clinical": {"per_finding": {"Cardiomegaly": {"f1": 0.75}}}, "per_report": [0.0, 1.0]}
    path = write_eval_json(tmp_path / "run" / "eval.json", metrics)
    assert path == tmp_path / "run" / "eval.json"
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == {"report": {"BLEU_4": 0.25, "CIDEr": 1.5}, "vqa": {"open": None, "n_open": 0},
                      "clinical": {"per_finding": {"Cardiomegaly": {"f1": 0.75}}}, "per_report": [0.0, 1.0]}
    assert os.listdir(path.parent) == ["eval.json"]  # no temp file left behind


def test_unwritable_metrics_leave_the_old_file(tmp_path):
    path = write_eval_json(tmp_path / "eval.json", {"BLEU_4": 0.1})
    with pytest.raises(ValueError, match="cannot be written as JSON.*Out of range float"):
        write_eval_json(path, {"BLEU_4": float("nan")})
    with pytest.raises(ValueError, match="cannot be written as JSON: object .* is not JSON serialisable"):
        write_eval_json(path, {"model": object()})
    with pytest.raises(ValueError, match="cannot be written as JSON: ndarray .* is not JSON serialisable"):
        write_eval_json(path, {"scores": np.zeros(3)})
    assert json.loads(path.read_text()) == {"BLEU_4": 0.1}
    assert os.listdir(tmp_path) == ["eval.json"]


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_eval_json(tmp_path, {"BLEU_4": 0.1})


def test_generations_jsonl_rows(tmp_path):
    path = write_generations(tmp_path / "generations.jsonl", ["ref one .", "réf two ."], ["gen one .", ""],
                             ids=["s1", "s2"], labels=[{"A": 1}, {"A": 0}], correct=[True, False])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "s1", "reference": "ref one .", "generation": "gen one .", "labels": {"A": 1}, "correct": True},
        {"id": "s2", "reference": "réf two .", "generation": "", "labels": {"A": 0}, "correct": False},
    ]
    assert "réf" in lines[1]  # UTF-8 text kept readable rather than \\u-escaped


def test_generations_default_ids_and_multiline_text(tmp_path):
    path = write_generations(tmp_path / "g.jsonl", ["a\nb", "c"], ["d", "e\n"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [0, 1]
    assert rows[0]["reference"] == "a\nb" and rows[1]["generation"] == "e\n"  # one line per sample regardless


def test_generations_bad_columns_raise(tmp_path):
    with pytest.raises(ValueError, match="one entry per sample.*'references': 2.*'generations': 1"):
        write_generations(tmp_path / "g.jsonl", ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="one entry per sample.*'ids': 1"):
        write_generations(tmp_path / "g.jsonl", ["a", "b"], ["c", "d"], ids=[7])
    with pytest.raises(ValueError, match="'reference' would overwrite"):
        write_generations(tmp_path / "g.jsonl", ["a"], ["c"], reference=["x"])
    with pytest.raises(TypeError, match="generations must be a sequence"):
        write_generations(tmp_path / "g.jsonl", ["a"], "c")
    with pytest.raises(ValueError, match=r"sample 0 \(id=0\).*Out of range float"):
        write_generations(tmp_path / "g.jsonl", ["a"], ["c"], score=[float("inf")])
    assert not (tmp_path / "g.jsonl").exists()
