"""Telemetry for the loop in one object: JSONL (+ TensorBoard, evaluations included), progress bar, throughput/MFU,
GPU sampling."""

from pathlib import Path
from typing import Any, Optional, Union

import torch

from mrgfast.training.gpu_monitor import GpuMonitor
from mrgfast.training.metrics_log import METRICS_NAME, JsonlLogger, open_tensorboard, write_scalars
from mrgfast.training.progress import ProgressBar
from mrgfast.training.throughput import Throughput, device_peak_tflops


class Telemetry:
    """Everything the loop reports. Only the main process writes; other ranks keep counters only.

    Per step call `step_done(tokens, attention_flops)` (host-only, no device read); every `log_every` steps call
    `log(step, metrics)` with values already read from the device.
    """

    def __init__(self, output_dir: Union[str, Path], total_steps: int, flops_per_token: float,
                 device: torch.device, initial_step: int = 0, main_process: bool = True, jsonl: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, gpu_sample_interval_s: float = 1.0,
                 peak_tflops: Optional[float] = None):
        output_dir = Path(output_dir)
        self.main = main_process
        if peak_tflops is None:
            peak_tflops, self.peak_source = device_peak_tflops(device)
        else:
            self.peak_source = "given"
        self.throughput = Throughput(flops_per_token, peak_tflops)
        # Lines after the step the run starts from belong to a run that did not go on (all of them for a fresh run):
        # they go, so no step is logged twice.
        self.jsonl = JsonlLogger(output_dir / METRICS_NAME, resume_step=initial_step) if main_process and jsonl \
            else None
        self.tensorboard = open_tensorboard(output_dir / "tensorboard") if main_process and tensorboard else None
        self.bar = ProgressBar(total_steps, initial_step, enabled=main_process and progress_bar)
        device = torch.device(device)
        self.gpu = GpuMonitor(device.index or 0, gpu_sample_interval_s) if device.type == "cuda" and main_process \
            else None
        if self.gpu is not None:
            self.gpu.start()
        self.pending_steps = 0

    def step_done(self, tokens: int, attention_flops: float = 0.0) -> None:
        """Count one optimizer step, the tokens it trained on and its attention FLOPs (this process)."""
        self.throughput.add(tokens, attention_flops)
        self.pending_steps += 1

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Add throughput (and GPU samples), write the record, advance the bar; returns the record."""
        record = dict(metrics)
        record.update(self.throughput.report())
        if self.gpu is not None:
            record.update(self.gpu.snapshot())
        written = self.jsonl.log(step, record) if self.jsonl is not None else record
        if self.tensorboard is not None:
            write_scalars(self.tensorboard, step, written)
        loss = record.get("loss")
        self.bar.update(self.pending_steps, loss=float(loss) if loss is not None else None,
                        tokens_per_s=record["tokens_per_s"])
        self.pending_steps = 0
        return written

    def log_eval(self, step: int, record: dict[str, Any]) -> None:
        """Send an evaluation's headline metrics to TensorBoard as `eval/<metric>` (eval.jsonl has them already)."""
        if self.tensorboard is not None:
            write_scalars(self.tensorboard, step, record, prefix="eval/")
            self.tensorboard.flush()

    def close(self) -> None:
        """Flush and close every sink and stop the GPU thread."""
        if self.pending_steps:
            self.bar.update(self.pending_steps)
            self.pending_steps = 0
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.gpu is not None:
            self.gpu.stop()
