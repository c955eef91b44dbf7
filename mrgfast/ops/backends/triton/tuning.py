"""Autotuning of the Triton kernels: token counts bucketed in the key, a fixed-config mode, choices kept on disk.

Packed and cut batches change their token count every step. `triton.autotune` keys on the raw argument values,
so each new count was a new tuning (the first H200 run re-tuned every step). `Tuned` keys on the token count's
power-of-two bucket instead, and keeps what it chose in a JSON file per kernel under `MRGFAST_TUNING_CACHE`
(default `~/.cache/mrgfast/triton-tuning`), so the next process does not tune again. This works the same on every
Triton 3.x: it needs only `kernel[grid](...)` and `triton.testing.do_bench`, not the autotuner's version-dependent
options (`cache_results` is missing from older releases).

`MRGFAST_TRITON_AUTOTUNE=off` runs each kernel with its first config (the next one where a config does not fit
the device) and benchmarks nothing: the GPU tests and the GPU suite's test part use it to stay short.
"""

import functools
import hashlib
import inspect
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mrgfast.common.files import atomic_write_text

AUTOTUNE_ENV = "MRGFAST_TRITON_AUTOTUNE"
CACHE_ENV = "MRGFAST_TUNING_CACHE"
OFF_VALUES = ("0", "off", "false", "no")
# do_bench's warm-up and measuring windows (ms) per candidate: Triton's defaults (25/100) spend ~1 s per key on
# seven candidates; the ranking of tile shapes is stable at these shorter windows.
BENCH_WARMUP_MS, BENCH_REP_MS = 10, 40


@dataclass(frozen=True)
class TuningEvent:
    """One tuning that benchmarked candidates: which kernel, its key, the chosen config and the seconds it took."""

    kernel: str
    key: tuple
    config: str
    seconds: float


# Called with every TuningEvent (tests count tunings with them); cache hits, in memory or on disk, call nothing.
listeners: list = []
# Every Tuned made, so forget() can drop what they hold in memory (as a new process would start).
_instances: list = []


def token_bucket(n: int) -> int:
    """The power of two at or above n (0 for 0): every token count in (2^(k-1), 2^k] shares one tuning."""
    n = int(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def autotune_enabled() -> bool:
    """False when MRGFAST_TRITON_AUTOTUNE says off: every kernel then runs its first config that fits."""
    return os.environ.get(AUTOTUNE_ENV, "on").strip().lower() not in OFF_VALUES


def cache_dir() -> Path:
    """Where tuned choices are kept across processes: MRGFAST_TUNING_CACHE, else ~/.cache/mrgfast/triton-tuning."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mrgfast" / "triton-tuning"


def forget() -> None:
    """Drop every choice held in memory (not on disk): the next launches behave as in a fresh process."""
    for tuned in _instances:
        tuned.choices.clear()
        tuned.files.clear()


def device_name(args: Sequence) -> str:
    """The name of the GPU the launch runs on (its first tensor's device), "cpu" off CUDA."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return cuda_device_name(arg.device.index) if arg.is_cuda else "cpu"
    return "cpu"


@functools.cache
def cuda_device_name(index: Optional[int]) -> str:
    """torch.cuda.get_device_name, asked once per device: every launch computes its key."""
    return torch.cuda.get_device_name(index)


def describe(config) -> str:
    """A config as text: its block sizes, warps and stages (stable across Triton versions, unlike str(config))."""
    blocks = ", ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks}, num_warps={config.num_warps}, num_stages={config.num_stages}"


def do_bench(fn: Callable[[], object]) -> float:
    """Mean milliseconds of fn on the GPU, by Triton's benchmarker."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS)


class Tuned:
    """A Triton kernel launched with the best of `configs` for its key.

    The key is the values of the `key` arguments (those named in `buckets` by token_bucket), the dtypes of the
    tensor arguments and every keyword flag (constexprs change the code). `restore` names tensor arguments the
    kernel adds into: they are put back after the candidates ran.
    """

    def __init__(self, kernel, configs: list, key: Sequence[str], buckets: Sequence[str] = (),
                 restore: Sequence[str] = (), bench: Optional[Callable[[Callable[[], object]], float]] = None):
        unknown = [name for name in (*key, *buckets, *restore) if name not in kernel.arg_names]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not arguments of {kernel_name(kernel)}")
        self.kernel, self.configs, self.key, self.buckets = kernel, list(configs), tuple(key), frozenset(buckets)
        self.restore, self.bench, self.name = tuple(restore), bench, kernel_name(kernel)
        self.choices: dict = {}  # key -> index into configs
        self.files: dict = {}    # cache file -> its choices as read from disk
        _instances.append(self)

    def key_of(self, args: Sequence, flags: dict) -> tuple:
        """The tuning key of one launch."""
        named = {**dict(zip(self.kernel.arg_names, args)), **flags}  # constexprs (R, say) come as keywords
        values = tuple(token_bucket(named[name]) if name in self.buckets else named[name] for name in self.key)
        dtypes = tuple(str(arg.dtype) for arg in args if isinstance(arg, torch.Tensor))
        return (device_name(args),) + values + dtypes + tuple(sorted(flags.items()))

    def __call__(self, grid, *args, **flags):
        """Launch the kernel on `grid` (a tuple, or a function of the launch's meta-parameters) with its config."""
        key = self.key_of(args, flags)
        if not autotune_enabled():
            return self.launch_fixed(key, grid, args, flags)
        if key not in self.choices:
            stored = self.read_stored(key)
            self.choices[key] = stored if stored is not None else self.tune(key, grid, args, flags)
        return self.launch(self.configs[self.choices[key]], grid, args, flags)

    def launch(self, config, grid, args, flags):
        """One launch with `config`'s block sizes, warps and stages."""
        return self.kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                 num_stages=config.num_stages)

    def launch_fixed(self, key, grid, args, flags):
        """No tuning: the first config, or the next where one does not fit (too much shared memory, say)."""
        if key in self.choices:
            return self.launch(self.configs[self.choices[key]], grid, args, flags)
        first_error = None
        for index, config in enumerate(self.configs):
            try:
                result = self.launch(config, grid, args, flags)
            except Exception as error:  # noqa: BLE001 - a config that cannot compile or launch here: try the next
                first_error = first_error or error
                continue
            self.choices[key] = index
            return result
        raise first_error

    def tune(self, key, grid, args, flags) -> int:
        """Benchmark every config on these arguments; keep the fastest, on disk too; tell the listeners."""
        named = dict(zip(self.kernel.arg_names, args))
        saved = {name: named[name].clone() for name in self.restore}
        start = time.perf_counter()
        bench = self.bench or do_bench  # looked up now, so tests can stand in for the GPU benchmarker
        timings, first_error = [], None
        for config in self.configs:
            try:
                timings.append(bench(lambda config=config: self.launch(config, grid, args, flags)))
            except Exception as error:  # noqa: BLE001 - a config that does not fit this device is left out
                first_error = first_error or error
                timings.append(float("inf"))
        for name, value in saved.items():
            named[name].copy_(value)
        if all(t == float("inf") for t in timings):
            raise RuntimeError(f"{self.name}: no config could run for key {key}") from first_error
        best = min(range(len(timings)), key=timings.__getitem__)
        self.store(key, best, timings[best])
        event = TuningEvent(self.name, key, describe(self.configs[best]), time.perf_counter() - start)
        for listener in list(listeners):
            listener(event)
        return best

    def cache_file(self, device: str) -> Path:
        """This kernel's choices on `device`: one file per kernel source, config list, Triton and device."""
        identity = f"{self.identity}\n{device}"
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
        return cache_dir() / f"{self.name}-{digest}.json"

    @functools.cached_property
    def identity(self) -> str:
        """What a stored choice is only valid for: the kernel's source, the configs, Triton's and CUDA's versions."""
        import triton

        try:
            source = inspect.getsource(self.kernel.fn)
        except (OSError, TypeError):  # no source file (a frozen install): the name stands in for it
            source = getattr(self.kernel.fn, "__qualname__", self.name)
        return "\n".join([source, *map(describe, self.configs), triton.__version__, str(torch.version.cuda)])

    def load(self, path: Path) -> dict:
        """The choices stored in `path` (read once per process), {} when it is missing or unreadable."""
        if path not in self.files:
            try:
                self.files[path] = json.loads(path.read_text(encoding="utf-8")).get("choices", {})
            except (OSError, ValueError, AttributeError):
                self.files[path] = {}
        return self.files[path]

    def read_stored(self, key) -> Optional[int]:
        """The config index a previous process chose for `key`, if it is on disk and still names this config."""
        entry = self.load(self.cache_file(key[0])).get(json.dumps(key, default=str))
        if not isinstance(entry, dict):
            return None
        index = entry.get("index")
        if isinstance(index, int) and 0 <= index < len(self.configs) and entry.get("config") == describe(
                self.configs[index]):
            return index
        return None

    def store(self, key, index: int, milliseconds: float) -> None:
        """Add one choice to the kernel's cache file (merged with what other processes wrote meanwhile)."""
        path = self.cache_file(key[0])
        self.files.pop(path, None)  # re-read: another process may have added keys since
        choices = dict(self.load(path))
        choices[json.dumps(key, default=str)] = {"index": index, "config": describe(self.configs[index]),
                                                 "ms": milliseconds}
        self.files[path] = choices
        try:
            atomic_write_text(path, json.dumps({"kernel": self.name, "device": key[0], "choices": choices},
                                               indent=1, sort_keys=True))
        except OSError as error:  # a read-only home still trains; it just tunes again next time
            warnings.warn(f"mrgfast: cannot keep Triton tuning results in {path.parent} ({error}); set "
                          f"{CACHE_ENV} to a writable directory", stacklevel=2)


def kernel_name(kernel) -> str:
    """A kernel's Python name (JIT and interpreted kernels alike)."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)

