"""The routed ops' benchmarks: a sweep stops starting cases at its deadline, keeps the report of what it measured,
and records each case's kernel ratios and routing case."""

import json
import sys

from benchmarks import group_tokens, harness


def test_a_sweep_stops_at_its_deadline_and_keeps_what_it_measured(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(harness.Run, "past_deadline", lambda self: calls.append(1) or len(calls) > 1)
    out = tmp_path / "group_tokens.json"
    monkeypatch.setattr(sys, "argv", ["group_tokens", "--quick", "--out", str(out), "--set", "warmup=0",
                                      "--set", "repeats=1"])
    group_tokens.main()
    report = json.loads(out.read_text())
    cases = list(group_tokens.QUICK["cases"])
    assert list(report["results"]) == cases[:1] and report["config"]["not_measured"] == cases[1:]
    first = report["results"][cases[0]]
    assert first["routing"]["op"] == "group_tokens" and first["routing"]["case"] == "2d"
    assert first["routing"]["size"] == 8 * 256 * 256 and first["routing"]["auto"] in ("reference", "cpu")
    assert set(first["kernels"]) == {"cpu"} and set(first["variants"]) == {"torch", "mrgfast", "cpu"}
    assert first["kernels"]["cpu"]["speed_ratio"] > 0


def test_a_deadline_in_the_past_measures_nothing_and_says_so(monkeypatch, tmp_path):
    out = tmp_path / "group_tokens.json"
    monkeypatch.setattr(sys, "argv", ["group_tokens", "--quick", "--out", str(out), "--set", "deadline_s=0"])
    group_tokens.main()
    report = json.loads(out.read_text())
    assert report["results"] == {} and report["config"]["not_measured"] == list(group_tokens.QUICK["cases"])
    assert report["speed_ratio"] is None
