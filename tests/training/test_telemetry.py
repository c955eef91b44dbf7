"""Telemetry: JSONL log, TensorBoard when installed, throughput/MFU, peak table, GPU sampler, progress bar."""

import importlib.util
import json
import threading
from types import SimpleNamespace

import pytest
import torch

from mrgfast.training import throughput as throughput_module
from mrgfast.training.gpu_monitor import GpuMonitor
from mrgfast.training.metrics_log import JsonlLogger, open_tensorboard, write_scalars
from mrgfast.training.progress import ProgressBar
from mrgfast.training.telemetry import Telemetry
from mrgfast.training.throughput import (Throughput, attention_flops, measure_cpu_tflops, peak_tflops_for,
                                         training_flops_per_token)


def read_lines(path):
    """The JSON records of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_one_flushed_line_per_step(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(1, {"loss": torch.tensor(2.5), "lr": 1e-4, "note": "x"})
    # Flushed: readable while the logger is still open.
    assert read_lines(tmp_path / "m.jsonl")[0]["loss"] == 2.5
    log.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "tokens": 7})
    log.close()
    first, second = read_lines(tmp_path / "m.jsonl")
    assert first["step"] == 1 and first["lr"] == 1e-4 and first["note"] == "x" and "time" in first
    assert second["loss"] == "nan" and second["grad_norm"] == "inf" and second["tokens"] == 7


def test_jsonl_rejects_non_scalars(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="metric 'v': expected a number or a one-element tensor"):
        log.log(1, {"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="metric 'v': expected a number or string, got list"):
        log.log(1, {"v": [1]})
    log.close()


def test_jsonl_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "m.jsonl"
    log = JsonlLogger(path)
    for step in (10, 20, 30):
        log.log(step, {"loss": 1.0})
    log.close()
    with open(path, "a") as handle:
        handle.write('{"step": 40, "lo')  # a line cut short by a crash
    log = JsonlLogger(path, resume_step=20)
    log.log(30, {"loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_lines(path)] == [(10, 1.0), (20, 1.0), (30, 0.5)]


def test_jsonl_takes_mappings_and_names_itself_when_a_write_fails(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log(1, {"data": {"read": 9, "kept": 8}})
    log.close()
    assert read_lines(tmp_path / "m.jsonl")[0]["data"] == {"read": 9, "kept": 8}
    (tmp_path / "full.jsonl").symlink_to("/dev/full")
    full = JsonlLogger(tmp_path / "full.jsonl")
    with pytest.raises(OSError, match="No space left on device") as info:
        full.log(1, {"loss": 1.0})
    assert info.value.filename == str(tmp_path / "full.jsonl")
    full.close()  # the failed line is not raised twice


def test_a_fresh_telemetry_drops_an_earlier_runs_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    Telemetry(tmp_path, 10, 1.0, torch.device("cpu"), tensorboard=False, progress_bar=False,
              peak_tflops=1.0).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_present_or_absent_without_error(tmp_path):
    writer = open_tensorboard(tmp_path / "tb")
    if importlib.util.find_spec("tensorboard") is None:
        assert writer is None
    else:
        assert writer is not None
        writer.close()


def test_write_scalars_sends_numbers_only():
    calls = []
    writer = SimpleNamespace(add_scalar=lambda k, v, s: calls.append((k, v, s)))
    write_scalars(writer, 5, {"step": 5, "time": 1.0, "loss": 0.5, "tokens": 3, "note": "x", "flag": True})
    assert calls == [("loss", 0.5, 5), ("tokens", 3, 5)]
    calls.clear()
    write_scalars(writer, 6, {"report/BLEU_4": 0.25}, prefix="eval/")
    assert calls == [("eval/report/BLEU_4", 0.25, 6)]


def test_flops_per_token():
    assert training_flops_per_token(1000, 1000, full_finetune=True) == 6000
    assert training_flops_per_token(1000, 10) == 4020
    with pytest.raises(ValueError, match="trainable_params <= total_params"):
        training_flops_per_token(10, 11)


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312.0),
    ("NVIDIA A10G", torch.bfloat16, 70.0),
    ("NVIDIA A10", torch.bfloat16, 125.0),
    ("NVIDIA L40S", torch.bfloat16, 362.05),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, 125.0),   # no bf16: its fp16 tensor-core peak
    ("Tesla V100-PCIE-32GB", torch.float16, 112.0),
    ("Tesla T4", torch.float16, 65.0),
    ("Some Future GPU", torch.bfloat16, None),
])
def test_peak_table(name, dtype, peak):
    assert peak_tflops_for(name, dtype) == peak


def test_cpu_peak_is_measured():
    tflops = measure_cpu_tflops(size=128, repeats=2)
    assert 1e-5 < tflops < 100


def test_throughput_report(monkeypatch):
    clock = iter([100.0, 102.0, 103.0])
    monkeypatch.setattr(throughput_module.time, "perf_counter", lambda: next(clock))
    meter = Throughput(flops_per_token=1e9, peak_tflops=4.0)
    meter.add(3000)
    meter.add(1000)
    out = meter.report()
    assert out == pytest.approx({"tokens_per_s": 2000.0, "tflops": 2.0, "mfu": 0.5})
    meter.add(500)
    assert meter.report()["tokens_per_s"] == pytest.approx(500.0)  # the interval restarted at the report


def test_attention_flops_count_the_causal_pairs_forward_and_backward(monkeypatch):
    # One document of 4 tokens: 1 + 2 + 3 + 4 = 10 query-key pairs; decoding 1 query over 5 keys: 5 pairs; a shared
    # DPO prompt: 2 queries over 6 keys see 5 and 6 keys, 11 pairs. Each pair is 4d FLOPs, x3 with the backward.
    assert attention_flops([(4, 4)], layers=1, attention_dim=1) == 12 * 10
    assert attention_flops([(1, 5), (2, 6)], layers=2, attention_dim=8) == 12 * 8 * (5 + 11) * 2
    assert attention_flops([], layers=3, attention_dim=8) == 0
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(throughput_module.time, "perf_counter", lambda: next(clock))
    meter = Throughput(flops_per_token=1e9, peak_tflops=4.0)
    meter.add(1000, extra_flops=1e12)  # 1 TFLOP of weight matmuls + 1 TFLOP of attention in one second
    assert meter.report() == pytest.approx({"tokens_per_s": 1000.0, "tflops": 2.0, "mfu": 0.5})


class FakeNvml:
    """Stands in for pynvml: fixed readings, counts samples; power unsupported when asked."""

    class NVMLError(Exception):
        """pynvml's error base class."""

    def __init__(self, power=True):
        self.samples, self.power = 0, power

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.samples += 1
        return SimpleNamespace(used=(2 + self.samples) * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetPowerUsage(self, handle):
        if not self.power:
            raise self.NVMLError("Not Supported")
        return 312_500


def test_gpu_monitor_absent_without_gpu_or_pynvml():
    if torch.cuda.is_available() and importlib.util.find_spec("pynvml") is not None:
        pytest.skip("a GPU and pynvml are present: the monitor is not absent here")
    threads = threading.active_count()
    monitor = GpuMonitor().start()
    assert not monitor.available and monitor.thread is None and threading.active_count() == threads
    assert monitor.snapshot() == {}
    monitor.stop()


def test_gpu_monitor_samples_on_a_thread():
    nvml = FakeNvml()
    monitor = GpuMonitor(device_index=1, interval_s=0.01, nvml=nvml).start()
    try:
        assert monitor.thread is not None and monitor.thread.daemon and monitor.handle == ("handle", 1)
        for _ in range(500):
            if nvml.samples >= 3:
                break
            threading.Event().wait(0.01)
        snap = monitor.snapshot()
    finally:
        monitor.stop()
    assert nvml.samples >= 3 and monitor.thread is None
    assert snap["gpu_util_pct"] == 87.0 and snap["gpu_power_w"] == 312.5
    assert snap["gpu_mem_peak_gb"] >= snap["gpu_mem_used_gb"] >= 3.0


def test_progress_bar_shows_loss_and_throughput(capsys):
    bar = ProgressBar(total=10, initial=2)
    bar.update(3, loss=1.23456, tokens_per_s=12345.6)
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.2346" in err and "tok/s=12,346" in err
    silent = ProgressBar(total=10, enabled=False)
    silent.update(1, loss=1.0)
    silent.close()
    assert capsys.readouterr().err == ""


def test_telemetry_writes_records_on_cpu(tmp_path, capsys):
    tel = Telemetry(tmp_path, total_steps=4, flops_per_token=1e6, device=torch.device("cpu"), peak_tflops=1.0)
    for step in (1, 2):
        tel.step_done(tokens=100)
        tel.log(step, {"loss": 2.0 / step})
    tel.close()
    records = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["mfu"] == pytest.approx(r["tflops"]) for r in records)
    assert not any(k.startswith("gpu_") for k in records[0])  # no GPU here: no GPU fields, no error
    assert "2/4" in capsys.readouterr().err


def test_telemetry_off_main_process_writes_nothing(tmp_path):
    tel = Telemetry(tmp_path, total_steps=4, flops_per_token=1e6, device=torch.device("cpu"), peak_tflops=1.0,
                    main_process=False)
    tel.step_done(tokens=10)
    record = tel.log(1, {"loss": 1.0})
    tel.close()
    assert record["loss"] == 1.0 and list(tmp_path.iterdir()) == []


def test_gpu_monitor_leaves_out_unsupported_readings():
    monitor = GpuMonitor(nvml=FakeNvml(power=False))
    monitor.sample()
    snap = monitor.snapshot()
    assert "gpu_power_w" not in snap and snap["gpu_util_pct"] == 87.0
    assert monitor.errors == {"nvmlDeviceGetPowerUsage": "Not Supported"}
