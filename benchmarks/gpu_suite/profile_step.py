"""One training step under torch.profiler: the top kernels by GPU time (CPU ops by self time off CUDA), with their
share of the step's wall time.

    python -m benchmarks.gpu_suite.profile_step --out PATH [--skip N] config=... [key=value ...]

The run is `mrgfast.train`'s own, eager (CUDA graphs would hide the kernels inside one replay); the step profiled
follows N steps that compile, tune and warm the allocator.
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

TOP = 25


def device_activities(events) -> dict:
    """Per kernel name (GPU activities: kernels, copies, memsets): calls and total microseconds."""
    table = defaultdict(lambda: [0, 0.0])
    for event in events:
        if event.device_type == DeviceType.CUDA:
            table[event.name][0] += 1
            table[event.name][1] += event.time_range.elapsed_us()
    return table


def cpu_ops(averages) -> dict:
    """Per CPU op: calls and self (exclusive) microseconds (the profiler's own step marker left out)."""
    return {event.key: [event.count, event.self_cpu_time_total] for event in averages
            if event.device_type == DeviceType.CPU and not event.key.startswith("ProfilerStep")}


def top_table(table: dict, step_us: float, top: int = TOP) -> list:
    """The `top` entries by time: name, calls, milliseconds and share of the step."""
    rows = sorted(table.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return [{"name": name, "calls": calls, "ms": us / 1e3, "share_of_step": us / step_us if step_us else None}
            for name, (calls, us) in rows]


def profile_one_step(argv: list, skip: int, cuda: bool) -> dict:
    """Train `skip` + 1 steps of the run `argv` describes, profiling the last; the report's figures."""
    from mrgfast.config import parse_cli
    from mrgfast.train.loop import train

    config = parse_cli([*argv, f"schedule.max_steps={skip + 1}", "cuda_graphs=false"])
    marks, traces = [], []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # The profiler's step k is training step k + 1: wait for skip - 1 steps, warm the profiler up on one, record one.
    plan = schedule(wait=max(skip - 1, 0), warmup=1 if skip else 0, active=1, repeat=1)
    with profile(activities=activities, schedule=plan, on_trace_ready=traces.append) as profiler:
        marks.append(time.perf_counter())

        def on_step(step, outputs):
            if cuda:
                torch.cuda.synchronize()  # the step's wall time covers its GPU work
            marks.append(time.perf_counter())
            profiler.step()

        train(config, on_step=on_step)
    if not traces:
        raise RuntimeError(f"the profiler recorded no step (steps run: {len(marks) - 1})")
    step_us = (marks[-1] - marks[-2]) * 1e6
    recorded = traces[-1]
    table = device_activities(recorded.events()) if cuda else cpu_ops(recorded.key_averages())
    busy_us = sum(us for _, us in table.values())
    return {"step_ms": step_us / 1e3, "device_ms" if cuda else "cpu_self_ms": busy_us / 1e3,
            "busy_share": busy_us / step_us, "what": "GPU kernels" if cuda else "CPU ops (self time)",
            "top": top_table(table, step_us)}


def main(argv=None) -> int:
    """Profile one step and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON report goes")
    parser.add_argument("--skip", type=int, default=3, help="steps run before the profiled one")
    args, run_argv = parser.parse_known_args(argv)
    cuda = torch.cuda.is_available() and "device=cpu" not in run_argv
    figures = profile_one_step(run_argv, args.skip, cuda)
    report = {"name": "profile", "config": {"run": run_argv, "skip": args.skip, "cuda_graphs": False},
              **figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"profile: one step {figures['step_ms']:.1f} ms, {figures['what']} busy {figures['busy_share']:.0%} of it")
    for row in figures["top"]:
        share = f"{row['share_of_step']:.1%}" if row["share_of_step"] is not None else "-"
        print(f"  {row['ms']:9.3f} ms {share:>6} {row['calls']:5d}x  {row['name'][:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
