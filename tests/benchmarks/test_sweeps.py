"""The routed ops' benchmarks: a sweep stops starting cases at its deadline, keeps the report of what it measured,
and records each case's kernel ratios and routing case."""

import importlib
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
    # The first case runs without asking; the deadline passes after the second.
    assert list(report["results"]) == cases[:2] and report["config"]["not_measured"] == cases[2:]
    first = report["results"][cases[0]]
    assert first["routing"]["op"] == "group_tokens" and first["routing"]["case"] == "2d"
    assert first["routing"]["size"] == 8 * 256 * 256 and first["routing"]["auto"] in ("reference", "cpu")
    assert set(first["kernels"]) == {"cpu"} and set(first["variants"]) == {"torch", "mrgfast", "cpu"}
    assert first["kernels"]["cpu"]["speed_ratio"] > 0


def test_a_deadline_in_the_past_measures_the_first_case_only(monkeypatch, tmp_path):
    out = tmp_path / "group_tokens.json"
    monkeypatch.setattr(sys, "argv", ["group_tokens", "--quick", "--out", str(out), "--set", "deadline_s=0",
                                      "--set", "warmup=0", "--set", "repeats=1"])
    group_tokens.main()
    report = json.loads(out.read_text())
    cases = list(group_tokens.QUICK["cases"])
    assert list(report["results"]) == cases[:1] and report["config"]["not_measured"] == cases[1:]
    assert report["speed_ratio"] == report["results"][cases[0]]["speed_ratio"]


def test_the_gpu_suites_smoke_runs_the_first_case_of_each_sweep():
    from benchmarks.gpu_suite import parts
    for name in parts.SWEEPS:
        argv = parts.benchmark_part(name, smoke=True).argv
        assert argv[-2:] == ("--set", "deadline_s=0") and "deadline_s" in importlib.import_module(
            f"benchmarks.{name}").QUICK
    assert "deadline_s=0" not in parts.benchmark_part("lora_linear", smoke=True).argv
