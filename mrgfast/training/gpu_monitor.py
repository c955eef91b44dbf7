"""GPU memory, utilisation and power sampled through NVML on a background thread, off the step path."""

import importlib
import threading
from typing import Any, Optional

import torch


def load_nvml():
    """The pynvml module (package nvidia-ml-py), initialised, or None when it or a GPU is unavailable."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError: no driver / no GPU; absent means no sampling, not an error
        return None
    return nvml


class GpuMonitor:
    """Samples one GPU every `interval_s` on a daemon thread; `snapshot()` returns the latest values.

    Without CUDA or without pynvml nothing starts and snapshot() is {}: the monitor is simply absent.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 1.0, nvml: Any = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.nvml = nvml if nvml is not None else (load_nvml() if torch.cuda.is_available() else None)
        self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index) if self.nvml is not None else None
        self.latest: dict[str, float] = {}
        self.peak_memory_gb = 0.0
        self.errors: dict[str, str] = {}  # NVML queries that failed, with the last message (for diagnosis)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: Optional[threading.Thread] = None

    @property
    def available(self) -> bool:
        """Whether NVML sampling is possible here."""
        return self.handle is not None

    def start(self) -> "GpuMonitor":
        """Start the sampling thread (nothing when unavailable)."""
        if self.available and self.thread is None:
            self.sample()
            self.thread = threading.Thread(target=self.run, name="mrgfast-gpu-monitor", daemon=True)
            self.thread.start()
        return self

    def run(self) -> None:
        """Thread body: sample until stopped."""
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read memory, utilisation and power once; a reading the GPU does not support is left out."""
        values = {}
        memory = self.read(self.nvml.nvmlDeviceGetMemoryInfo)
        if memory is not None:
            used_gb = memory.used / 2**30
            values["gpu_mem_used_gb"] = used_gb
            values["gpu_mem_peak_gb"] = self.peak_memory_gb = max(self.peak_memory_gb, used_gb)
        util = self.read(self.nvml.nvmlDeviceGetUtilizationRates)
        if util is not None:
            values["gpu_util_pct"] = float(util.gpu)
        power_mw = self.read(self.nvml.nvmlDeviceGetPowerUsage)
        if power_mw is not None:
            values["gpu_power_w"] = power_mw / 1000.0
        with self.lock:
            self.latest = values

    def read(self, query):
        """query(handle), or None when NVML reports the reading as unsupported or failing on this GPU."""
        try:
            return query(self.handle)
        except getattr(self.nvml, "NVMLError", ()) as err:  # e.g. power readings on some boards
            self.errors[query.__name__] = str(err)
            return None

    def snapshot(self) -> dict[str, float]:
        """The latest sample ({} when unavailable)."""
        with self.lock:
            return dict(self.latest)

    def stop(self) -> None:
        """Stop the thread."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=5 * self.interval_s)
            self.thread = None
