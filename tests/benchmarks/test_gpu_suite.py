"""The GPU suite's own logic: the parts and their order, --only, the budget, failures and skips, the files it writes."""

import importlib
import importlib.util
import json
import sys
import types

import pytest

from benchmarks.gpu_suite import __main__ as suite_main
from benchmarks.gpu_suite import parts as parts_module
from benchmarks.gpu_suite import profile_step
from benchmarks.gpu_suite.parts import Part, all_parts, benchmark_names, select, shares
from benchmarks.gpu_suite.readers import read_pytest, read_train
from benchmarks.gpu_suite.runner import run_part, run_process, run_suite


def test_parts_run_in_order_and_every_benchmark_is_one():
    parts = all_parts(smoke=False)
    names = [p.name for p in parts]
    assert names[0] == "tests" and names[-4:] == ["train_cuda_graphs", "train_1b", "train_7b", "profile"]
    assert names[1:3] == ["lora_linear", "linear_cross_entropy"]  # the most telling kernels first
    groups = [p.group for p in parts]
    assert groups == sorted(groups, key=["tests", "kernels", "e2e", "train", "profile"].index)
    # Helpers are not benchmarks; every script that opens a harness run is.
    assert not {"harness", "variants", "e2e_common", "peers", "crossover"} & set(names)
    assert {"lora_linear", "e2e_sft", "e2e_dpo", "cost_model"} <= set(names)
    assert dict(next(p for p in parts if p.name == "tests").env) == {"MRGFAST_TRITON_AUTOTUNE": "off"}
    assert sum(p.seconds for p in parts) <= parts_module.DEFAULT_BUDGET


def test_benchmarks_are_found_by_what_they_are(monkeypatch, tmp_path):
    (tmp_path / "new_bench.py").write_text("run = harness.open_run(NAME, __doc__, QUICK, FULL)\n")
    (tmp_path / "helper.py").write_text("def shared(): pass\n")
    (tmp_path / "hf_patch.py").write_text("# named in E2E_ORDER: included wherever it exists\n")
    monkeypatch.setattr(parts_module, "BENCHMARKS", tmp_path)
    assert benchmark_names() == ["hf_patch", "new_bench"]
    new = parts_module.benchmark_part("new_bench", smoke=True)
    assert new.group == "e2e" and new.seconds == parts_module.NEW_BENCHMARK_SECONDS
    assert new.argv[-5:] == ("--quick", "--set", "warmup=0", "--set", "repeats=1")


def test_gpu_shapes_are_passed_as_overrides():
    part = parts_module.benchmark_part("linear_cross_entropy", smoke=False)
    assert "--quick" not in part.argv and "tokens=16384" in part.argv
    assert parts_module.benchmark_part("lora_linear", smoke=False).argv[-2:] == ("--scale", "gpu")
    assert parts_module.benchmark_part("e2e_sft", smoke=False).argv[-2:] == ("--scale", "gpu")
    assert "--scale" not in parts_module.benchmark_part("e2e_sft", smoke=True).argv
    assert parts_module.benchmark_part("e2e_dpo", smoke=False).requires == ("trl",)


def test_routed_ops_run_their_gpu_presets_at_the_issues_sizes_within_their_share():
    """The GPU presets measure the issue's training sizes first, then sweep smaller ones, and stop starting cases
    before the part's time box ends (its share less the process's start-up)."""
    for name in ("grouped_projection", "group_tokens", "affine_prompt"):
        part = parts_module.benchmark_part(name, smoke=False)
        assert part.argv[-2:] == ("--scale", "gpu") and name not in parts_module.GPU_SHAPES
        preset = importlib.import_module(f"benchmarks.{name}").GPU
        assert 0 < preset["deadline_s"] <= parts_module.DEFAULT_SECONDS[name] - 5
        assert "--scale" not in parts_module.benchmark_part(name, smoke=True).argv
    projection = importlib.import_module("benchmarks.grouped_projection").GPU["cases"]
    assert list(projection)[:2] == ["pefomed_1d_16img", "qwen2vl_2d_16img"]
    assert projection["pefomed_1d_16img"] == (16, 1024, 1408, 4096, 4, "1d", None)
    assert projection["qwen2vl_2d_16img"] == (16, 1024, 1280, 5120, 4, "2d", (32, 32))
    assert sorted({shape[0] for shape in projection.values()}) == [1, 2, 4, 8, 16]
    affine = importlib.import_module("benchmarks.affine_prompt").GPU["cases"]
    assert affine[:2] == [(32, 32, 1, 4096, 256), (32, 32, 8, 4096, 256)]  # MRG-LLM: B=32, L=32, D=4096, K 1 and 8
    assert sorted({case[0] for case in affine}) == [1, 2, 4, 8, 16, 32]
    grouping = importlib.import_module("benchmarks.group_tokens").GPU["cases"]
    assert grouping["group_2d_16img"] == (16, 1024, 1280, "2d", (32, 32), False)


def test_gpu_shapes_name_fields_the_benchmarks_have():
    for name, shape in parts_module.GPU_SHAPES.items():
        full = importlib.import_module(f"benchmarks.{name}").FULL
        assert set(shape) <= set(full), f"{name}: {set(shape) - set(full)}"


@pytest.mark.parametrize("smoke", [False, True], ids=["gpu", "smoke"])
def test_the_training_runs_parse(smoke):
    from mrgfast.config import parse_cli

    for part in (parts_module.train_part(smoke), parts_module.profile_part(smoke)):
        argv = [arg.replace("{work}", "/tmp/x") for arg in part.argv if "=" in arg and not arg.startswith("--")]
        config = parse_cli(argv)
        assert config.model.recipe == "pefomed" and config.resume == "none"
        assert (config.device, config.model.hidden_size) == (("cpu", 64) if smoke else ("cuda", 2048))
    sizes = {"train_1b": (2048, 16, 128256), "train_7b": (3584, 28, 152064)}
    for name, (hidden, layers, vocab) in sizes.items():
        part = parts_module.mfu_part(name, smoke)
        config = parse_cli([arg.replace("{work}", "/tmp/x") for arg in part.argv if "=" in arg and not
                            arg.startswith("--")])
        assert config.cuda_graphs and config.resume == "none"
        if not smoke:
            m = config.model
            assert (m.hidden_size, m.num_hidden_layers, m.vocab_size, m.dtype) == (hidden, layers, vocab, "bfloat16")
            assert (config.data.token_budget, config.data.rows, config.lora.r) == (4096, 4, 64)


def test_only_takes_parts_and_groups_in_suite_order():
    parts = all_parts(smoke=True)
    chosen = select(parts, "profile, kernels,tests")
    assert [p.group for p in chosen][0] == "tests" and chosen[-1].name == "profile"
    assert {p.group for p in chosen} == {"tests", "kernels", "profile"}
    assert [p.name for p in select(parts, "e2e_sft")] == ["e2e_sft"]
    assert select(parts, "") == parts
    with pytest.raises(ValueError, match="unknown bogus.*choose from parts tests"):
        select(parts, "tests,bogus")


def fake(name, seconds=10, group="e2e", requires=(), reader="json"):
    """A part whose command is not run for real (the tests pass a stand-in runner)."""
    return Part(name, group, seconds, ("python", "-m", name, "--out", "{json}"), reader, requires)


def test_budget_shares_scale_down_never_up():
    parts = [fake("a", 100), fake("b", 300)]
    assert shares(parts, 800) == {"a": 100, "b": 300}
    assert shares(parts, 200) == {"a": 50, "b": 150}


class StandIn:
    """Plays each part's process: writes its report and log as told, returns (exit code, seconds)."""

    def __init__(self, plan):
        self.plan, self.limits = plan, {}

    def __call__(self, argv, env, log, limit):
        name = argv[2]
        self.limits[name] = limit
        code, seconds, text, report = self.plan[name]
        log.write_text(text)
        if report is not None:
            json_path = argv[argv.index("--out") + 1]
            with open(json_path, "w") as f:
                json.dump(report, f)
        return code, seconds


def test_a_failing_part_is_recorded_and_the_suite_goes_on(tmp_path):
    parts = [fake("a", 10), fake("b", 10), fake("c", 10), fake("d", 10, requires=("liger_kernel",)),
             fake("e", 10)]
    run = StandIn({"a": (1, 2.0, "Traceback\nRuntimeError: boom\n", None),
                   "b": (None, 10.0, "still going\n", None),
                   "c": (1, 1.0, "ModuleNotFoundError: No module named 'flash_attn.bert_padding'\n", None),
                   "e": (0, 3.0, "fine\n", {"name": "e", "results": {}, "speed_ratio": 1.5, "memory_ratio": 0.5})})
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    seen = []
    results = run_suite(parts, 50, tmp_path, lambda result, elapsed: seen.append(result["name"]), run=run)
    assert seen == ["a", "b", "c", "d", "e"]
    status = {r["name"]: (r["status"], r["error"]) for r in results}
    assert status["a"][0] == "failed" and "RuntimeError: boom" in status["a"][1]
    assert status["b"][0] == "timeout" and "time box of 18 s" in status["b"][1]
    assert status["c"] == ("skipped", "missing optional package: flash-attn")
    assert status["d"] == ("skipped", "missing optional package: liger-kernel")
    assert status["e"][0] == "ok" and results[-1]["report"]["speed_ratio"] == 1.5
    # Unused time goes on: a took 2 of its 10 s, so b had 18; e had all the 50 s that a, b, c (and d) left.
    assert run.limits["b"] == 18 and run.limits["e"] == 50 - (2 + 10 + 1)
    assert (tmp_path / "logs" / "a.log").exists() and "d" not in run.limits


def test_a_part_that_cannot_start_or_leaves_a_broken_report_is_a_failure(tmp_path):
    def cannot_start(argv, env, log, limit):
        raise FileNotFoundError("no such interpreter")
    results = run_suite([fake("a"), fake("b", reader="pytest")], 50, tmp_path, lambda *_: None, run=cannot_start)
    assert [r["status"] for r in results] == ["failed", "failed"] and "no such interpreter" in results[0]["error"]

    def half_written(argv, env, log, limit):
        (tmp_path / "work" / "b" / "junit.xml").write_text("<testsuites><testsu")
        return 1, 1.0
    result = run_part(fake("b", reader="pytest"), 50, tmp_path, run=half_written)
    assert result["status"] == "failed" and "no report: ParseError" in result["error"]


def test_a_part_is_skipped_when_the_budget_is_spent(tmp_path):
    result = run_part(fake("late"), 2.0, tmp_path, run=StandIn({}))
    assert result["status"] == "skipped" and "no time left" in result["error"]


def test_the_time_box_stops_the_process_group(tmp_path):
    log = tmp_path / "sleep.log"
    code, seconds = run_process([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                {}, log, 1.5)
    assert code is None and seconds < 15 and "started" in log.read_text()


def test_readers(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="5" time="3.5">'
                     '<testcase classname="tests.ops.test_x" name="test_ok"/>'
                     '<testcase classname="tests.ops.test_x" name="test_bad"><failure message="no"/></testcase>'
                     '</testsuite></testsuites>')
    assert read_pytest(junit) == {"name": "tests", "passed": 2, "failed": 1, "errors": 0, "skipped": 2,
                                  "seconds": 3.5, "failing": ["tests.ops.test_x::test_bad"]}
    metrics = tmp_path / "metrics.jsonl"
    records = [dict(step=5, loss=6.6, tokens_per_s=650.0, mfu=0.001, gpu_mem_peak_gb=10.8, graph_replays=2),
               dict(step=10, loss=6.2, tokens_per_s=73000.0, mfu=0.128, gpu_mem_peak_gb=10.9, graph_replays=7),
               dict(step=15, loss=5.9, tokens_per_s=69000.0, mfu=0.121, gpu_mem_peak_gb=10.9, graph_replays=12)]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train = read_train(metrics)
    assert train["tokens_per_s"] == 69000.0 and train["gpu_mem_peak_gb"] == 10.9 and train["steps"] == 15
    assert train["loss_first"] == 6.6 and train["loss_last"] == 5.9 and train["records_after_warmup"] == 3


def test_profile_table_of_kernels_with_their_share_of_the_step():
    from torch.autograd import DeviceType

    def event(name, us, device=DeviceType.CUDA):
        return types.SimpleNamespace(name=name, device_type=device,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us))
    table = profile_step.device_activities([event("gemm", 600.0), event("gemm", 200.0), event("softmax", 100.0),
                                            event("aten::mm", 900.0, DeviceType.CPU)])
    rows = profile_step.top_table(table, step_us=1000.0, top=1)
    assert rows == [{"name": "gemm", "calls": 2, "ms": 0.8, "share_of_step": 0.8}]


def test_main_writes_suite_json_and_summary_and_fails_on_a_failed_part(monkeypatch, tmp_path, capsys):
    ok = Part("good", "kernels", 10, (sys.executable, "-c", "import json,sys; json.dump({'name': 'good', "
                                      "'results': {'c': {'variants': {'mrgfast': {'median_ms': 1.0, 'peak_bytes': "
                                      "1048576}}, 'speed_ratio': 2.0, 'memory_ratio': 0.5}}, 'speed_ratio': 2.0, "
                                      "'memory_ratio': 0.5}, open(sys.argv[1], 'w'))", "{json}"), "json")
    bad = Part("bad", "e2e", 10, (sys.executable, "-c", "raise SystemExit('bad: mismatch')"), "json")
    monkeypatch.setattr(suite_main, "all_parts", lambda smoke: [ok, bad])
    monkeypatch.setattr(suite_main, "probe", lambda: {"device": "cpu", "commit": "abc", "torch": "2", "triton": "3"})
    assert suite_main.main(["--cpu-smoke", "--out", str(tmp_path), "--budget", "60"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[3:5] == ["good", "ok"] for line in lines)
    assert any(line.split()[3:5] == ["bad", "failed"] for line in lines)
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert [p["name"] for p in suite["parts"]] == ["good", "bad"] and suite["mode"] == "cpu-smoke"
    assert suite["parts"][0]["report"]["speed_ratio"] == 2.0 and "bad: mismatch" in suite["parts"][1]["error"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| good | c | mrgfast median ms | 1 |" in summary and "| good | c | mrgfast peak MiB | 1 |" in summary
    assert "| bad | failed |" in summary and "commit abc" in summary
    assert suite_main.main(["--only", "nothing-like-this"]) == 2
