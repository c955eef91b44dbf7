"""Benchmark harness: each main()'s opening (open_run), machine info, alternating timing, peak memory, JSON report."""

import argparse
import ast
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench-results"
MIB = 1024.0 ** 2


def parse_args(name: str, description: str, argv=None) -> argparse.Namespace:
    """The shared command line: `--quick` for small shapes, `--out` for the JSON path, `--set` to change a shape."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes that finish in seconds on 2 CPU cores")
    parser.add_argument("--scale", choices=("quick", "full", "gpu"), default=None,
                        help="the shapes: quick (= --quick), full (the default) or gpu (sizes where GPUs are the "
                             "point, for benchmarks that define them)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help=f"where the JSON report goes (default: bench-results/{name}.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change one field of the shapes (a Python literal: tokens=8192, warmup=0); repeatable")
    return parser.parse_args(argv)


def with_overrides(shape: dict, overrides: list[str]) -> dict:
    """`shape` with `--set KEY=VALUE` applied (values read as Python literals, else kept as text); a key the shape
    does not have is an error that lists the ones it has."""
    shape = dict(shape)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in shape:
            raise SystemExit(f"--set {item}: expected KEY=VALUE with KEY one of {', '.join(shape)}")
        try:
            shape[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            shape[key] = text
    return shape


def default_device() -> torch.device:
    """CUDA when present, else CPU: one script serves both."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> Optional[str]:
    """Triton's version if it can be imported, else None."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, threads, torch, CUDA device, triton."""
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "triton": triton_version(),
        "load_average_1min_at_start": load_average(),
    }


def load_average() -> Optional[float]:
    """The 1-minute load average (this run's own threads included)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_busy_seconds() -> Optional[float]:
    """CPU-seconds all cores have spent busy since boot, steal time included (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat", encoding="utf-8") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def busy_snapshot() -> tuple[float, Optional[float], float]:
    """(wall clock, machine busy CPU-seconds, this process's CPU-seconds) now."""
    own = os.times()
    return time.monotonic(), machine_busy_seconds(), own.user + own.system


def others_cpu_share(start: tuple[float, Optional[float], float]) -> Optional[float]:
    """Share of all cores that other processes (and the hypervisor) used since `start`: 0 is a quiet machine."""
    wall0, busy0, own0 = start
    wall1, busy1, own1 = busy_snapshot()
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))


def start_run() -> dict:
    """Call before measuring: the machine description and the snapshot that write_report's contention figure needs."""
    return {"machine": machine_info(), "busy_start": busy_snapshot()}


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 matmul on these CPUs is ~500x slower than fp32: see DESIGN.md)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Run:
    """One benchmark run as main() opens it: its name, options, shapes, device, dtype and the machine snapshot."""

    name: str
    quick: bool
    out: Path
    shape: dict  # QUICK or FULL, as --quick says
    device: torch.device
    dtype: torch.dtype
    started: dict  # start_run()'s machine description and CPU-usage snapshot
    overrides: tuple = ()  # the --set KEY=VALUE items the shapes were changed by

    def config(self, fields: dict) -> dict:
        """The report's config: mode, device, dtype and any --set first, then the benchmark's own fields (which may
        override)."""
        changed = {"overrides": list(self.overrides)} if self.overrides else {}
        return {"mode": "quick" if self.quick else "full", "device": self.device.type,
                "dtype": str(self.dtype).split(".")[-1], **changed, **fields}

    def report(self, fields: dict, results: dict[str, dict]) -> dict:
        """write_report of `results` with config(fields), to --out."""
        return write_report(self.name, self.config(fields), results, self.out, self.started)

    def checkpoint(self, fields: dict, results: dict[str, dict]) -> None:
        """The report of the cases measured so far, to --out, quietly: a run that its time box stops keeps them."""
        write_json(self.out, build_report(self.name, self.config(fields), results, self.started))

    def past_deadline(self) -> bool:
        """Whether the shapes' `deadline_s` (seconds since the run opened; None: no deadline) has passed: a sweep
        starts no further case after it (its first always runs), so it ends inside the GPU suite's time box."""
        deadline = self.shape.get("deadline_s")
        return deadline is not None and time.monotonic() - self.started["busy_start"][0] > deadline


    def sweep(self, fields: dict, cases: Iterable[tuple[str, Callable[[], dict]]]) -> dict:
        """Run each (label, measure) case in order, measure() returning {result label: result}, until past_deadline()
        (the first case, the training size, always runs); checkpoint after each, list the cut ones under
        "not_measured", and write the report."""
        results, skipped = {}, []
        for label, measure in cases:
            if results and self.past_deadline():
                skipped.append(label)
                continue
            results.update(measure())
            self.checkpoint({**fields, "not_measured": skipped}, results)
        return self.report({**fields, "not_measured": skipped}, results)


def open_run(name: str, description: str, quick: dict, full: dict, gpu: Optional[dict] = None) -> Run:
    """Every benchmark main()'s opening: parse --quick / --scale / --out / --set, snapshot the machine, pick shapes,
    device, dtype."""
    args = parse_args(name, description)
    scale = "quick" if args.quick else (args.scale or "full")
    presets = {"quick": quick, "full": full, "gpu": gpu}
    if presets[scale] is None:
        raise SystemExit(f"{name}: --scale {scale}: this benchmark has no {scale} shapes (it has quick and full)")
    if args.quick and args.scale not in (None, "quick"):
        raise SystemExit(f"{name}: --quick and --scale {args.scale} ask for different shapes")
    shape = with_overrides(presets[scale], args.overrides)
    started = start_run()
    device = default_device()
    return Run(name, scale == "quick", args.out, shape, device, compute_dtype(device), started, tuple(args.overrides))


def cycling(items: list, step: Callable[[object], object]) -> Callable[[], object]:
    """A no-argument step that runs `step` on the next of `items` each call (round robin)."""
    state = {"i": 0}

    def run():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return step(item)
    return run


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall time covers it; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     reset: Optional[Callable[[], object]] = None) -> dict[str, dict]:
    """Median and min wall time (ms) per fn; the fns take turns in every repeat so drift hits all alike.

    `reset` (e.g. dropping gradients) runs before every call, outside the timed window.
    """
    reset = reset or (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            reset()
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one sample would be charged to whichever fn ran
    try:
        for i in range(repeats):
            # Rotate the order so no fn always runs right after the same neighbour (caches, freed pages).
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                reset()
                synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_ms": statistics.median(s), "min_ms": min(s), "samples_ms": s}
            for name, s in samples.items()}


class LiveStorageTracker(TorchDispatchMode):
    """Peak bytes of torch storages allocated under this mode and alive at the same time (CPU peak memory).

    Outputs that alias an input's storage (views, in-place and out= ops) are not new memory; storages
    that existed before the mode was entered are never counted. Backward runs under the mode too.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def sweep(self) -> None:
        """Forget storages that have been freed since the last op."""
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        # Sweep before counting, so memory freed by earlier ops is not summed with this op's outputs.
        self.sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata in self.live or storage.data_ptr() in inputs:
                    continue
                self.live[ref.cdata] = (ref, storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device,
                      reset: Optional[Callable[[], object]] = None) -> int:
    """Peak bytes that one call of fn allocates above what was allocated before it (see README.md).

    `reset` runs first, outside the measurement: memory it frees (old gradients) is not credited to fn.
    """
    if reset is not None:
        reset()
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    with LiveStorageTracker() as tracker:
        fn()
    return tracker.peak


def measure_case(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                 baseline: str, candidate: str, reset: Optional[Callable[[], object]] = None) -> dict:
    """Time (alternating) and then memory-profile each fn; ratios compare candidate with baseline.

    `reset` runs before every call of every fn, outside what is measured.
    """
    timings = time_alternating(fns, device, warmup, repeats, reset)
    # Memory runs come after timing and apart from it: the CPU tracker slows every op down.
    variants = {name: {**timings[name], "peak_bytes": peak_memory_bytes(fn, device, reset)}
                for name, fn in fns.items()}
    base, cand = variants[baseline], variants[candidate]
    return {
        "baseline": baseline,
        "candidate": candidate,
        "variants": variants,
        "speed_ratio": base["median_ms"] / cand["median_ms"],
        "memory_ratio": cand["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None,
    }


def headline(results: dict[str, dict]) -> tuple[float, Optional[float]]:
    """The least favourable case: lowest speed_ratio and highest memory_ratio over the cases.

    Cases marked "ablation" (a design alternative measured for comparison, not what mrgfast runs) or "peer" (another
    fast library, not the eager baseline) are left out.
    """
    cases = [case for case in results.values() if not case.get("ablation") and not case.get("peer")]
    speed = min(case["speed_ratio"] for case in cases)
    memories = [case["memory_ratio"] for case in cases if case["memory_ratio"] is not None]
    return speed, (max(memories) if memories else None)


def print_table(name: str, results: dict[str, dict]) -> None:
    """A short human-readable table of every case: time, memory and the case's ratios."""
    print(f"{name}: {'case':<22} {'variant':<10} {'median ms':>10} {'min ms':>10} {'peak MiB':>10}")
    for case_name, case in results.items():
        for variant, v in case["variants"].items():
            print(f"{'':<{len(name) + 2}}{case_name:<22} {variant:<10} {v['median_ms']:>10.2f} "
                  f"{v['min_ms']:>10.2f} {v['peak_bytes'] / MIB:>10.2f}")
        ratios = {k: v for k, v in case.items() if k not in ("baseline", "candidate", "variants")}
        text = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in ratios.items())
        print(f"{'':<{len(name) + 2}}{case_name:<22} {text}")


def plot(name: str, results: dict[str, dict], path: Path) -> bool:
    """Bar charts of median time and peak memory per case and variant; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only: benchmarks run headless
    import matplotlib.pyplot as plt

    cases = list(results)
    variants = list(dict.fromkeys(v for case in results.values() for v in case["variants"]))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, scale in ((axes[0], "median_ms", "median ms", 1.0), (axes[1], "peak_bytes", "peak MiB", MIB)):
        for i, variant in enumerate(variants):
            values = [results[c]["variants"].get(variant, {}).get(key, 0) / scale for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=variant)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(cases))], cases)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_report(name: str, config: dict, results: dict[str, dict], run: dict) -> dict:
    """The JSON report: name, machine (with the load and contention since `run` started), config, results, headline."""
    speed_ratio, memory_ratio = headline(results) if results else (None, None)
    busy_start = run.get("busy_start")
    machine = {**run.get("machine", run), "load_average_1min_at_end": load_average(),
               "others_cpu_share": others_cpu_share(busy_start) if busy_start else None}
    return {"name": name, "machine": machine, "config": config, "results": results,
            "speed_ratio": speed_ratio, "memory_ratio": memory_ratio}


def write_json(out: Path, report: dict) -> None:
    """Write `report` to `out` atomically: never a half-written report where an old one was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)


def write_report(name: str, config: dict, results: dict[str, dict], out: Path, run: dict) -> dict:
    """Write the JSON report (and a PNG beside it when matplotlib exists); print the table.

    `run` is start_run()'s result; a bare machine_info() also works, without the others_cpu_share figure.
    """
    report = build_report(name, config, results, run)
    speed_ratio, memory_ratio, machine = report["speed_ratio"], report["memory_ratio"], report["machine"]
    write_json(out, report)
    print_table(name, results)
    if plot(name, results, out.with_suffix(".png")):
        print(f"{name}: plot -> {out.with_suffix('.png')}")
    if (machine["others_cpu_share"] or 0.0) > 0.05:
        print(f"{name}: warning: other processes used {machine['others_cpu_share']:.0%} of the cores meanwhile; "
              "CPU timings are unreliable")
    speed_text, memory_text = ("n/a" if r is None else f"{r:.3f}" for r in (speed_ratio, memory_ratio))
    print(f"{name}: speed_ratio={speed_text} memory_ratio={memory_text} (least favourable case) -> {out}")
    return report
