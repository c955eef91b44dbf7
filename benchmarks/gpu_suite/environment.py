"""What a suite run measured on: device, driver, torch, Triton, CUDA, Python, CPU, optional packages, the commit.

`python -m benchmarks.gpu_suite.environment` prints it as JSON: the suite asks a child process, so that its own
process never holds a CUDA context (and its memory) while the parts run.
"""

import importlib.metadata
import json
import platform
import subprocess
import sys
from typing import Optional

from benchmarks.gpu_suite.parts import OPTIONAL_PACKAGES, REPO_ROOT


def driver_version() -> Optional[str]:
    """The NVIDIA driver's version from nvidia-smi, None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def package_version(name: str) -> Optional[str]:
    """An installed distribution's version, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """This process's view of the machine (it imports torch and, on a GPU, creates a CUDA context)."""
    import torch

    from benchmarks.harness import cpu_model, triton_version
    from mrgfast.ops.backends.native.extension import cuda_kernels_built

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
        "python": platform.python_version(), "cpu_model": cpu_model(),
        "mrgfast_cuda_kernels": cuda_kernels_built() if cuda else None,
        "optional_packages": {pip: package_version(pip) for pip in OPTIONAL_PACKAGES.values()},
    }


def commit() -> dict:
    """The checked-out commit and whether the tree had changes (a run of uncommitted code says so)."""
    def git(*args):
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    head = git("rev-parse", "--short=12", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "dirty": bool(status) if status is not None else None}


def probe(timeout: float = 120.0) -> dict:
    """describe() from a child process, with the commit; {"error": ...} in place of the machine when it fails."""
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite.environment"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        machine = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
            {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as error:
        machine = {"error": f"environment probe failed: {error}"}
    return {**machine, **commit()}


if __name__ == "__main__":
    print(json.dumps(describe()))
