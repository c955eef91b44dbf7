"""Packaging for mrgfast: the Python package plus the native extension mrgfast._C built by CMakeLists.txt."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt rather than by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, placing the library where Python imports it."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        with_cuda = build_cuda_kernels()
        print(f"mrgfast._C: CPU kernels{' + CUDA kernels' if with_cuda else ' (CUDA kernels off: ' + CUDA_REASON + ')'}")
        subprocess.check_call(
            ["cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_BUILD_TYPE={config}",
             f"-DMRGFAST_WITH_CUDA={'ON' if with_cuda else 'OFF'}"],
            cwd=build_dir,
        )
        jobs = str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", ".", "--config", config, "-j", jobs], cwd=build_dir)


CUDA_REASON = ""


def torch_cuda_version() -> str:
    """torch.version.cuda of the environment being installed into ('' for a CPU build or no torch).

    pip builds in an isolated environment whose sitecustomize hides the target's site-packages; a child
    interpreter without pip's PYTHONPATH sees them, and so sees the torch the extension will run with.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda or '')"],
                           capture_output=True, text=True, env=env)
    return probe.stdout.strip() if probe.returncode == 0 else ""


def build_cuda_kernels() -> bool:
    """Whether to compile kernels/*.cu: MRGFAST_CUDA=1/0 forces it; by default nvcc and a CUDA torch must exist."""
    global CUDA_REASON
    forced = os.environ.get("MRGFAST_CUDA", "").strip()
    if forced in ("0", "1"):
        CUDA_REASON = "MRGFAST_CUDA=0"
        return forced == "1"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        CUDA_REASON = "no CUDA toolkit (nvcc) found"
        return False
    if not torch_cuda_version():
        CUDA_REASON = "torch is a CPU build"
        return False
    return True


def native_extensions():
    """The CMake-built extension mrgfast._C."""
    return [CMakeExtension("mrgfast._C")] if (ROOT / "CMakeLists.txt").exists() else []


setup(
    name="mrgfast",
    version="0.1.0",
    description="Fast parameter-efficient fine-tuning of multimodal LLMs for medical report generation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrgfast", "mrgfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "pyyaml", "pillow", "tqdm", "pycocoevalcap",
                      "transformers>=5", "tokenizers"],  # transformers: HF vision towers and tokenizers
    extras_require={
        # triton ships with CUDA builds of torch; the CPU wheel needs it for the interpreter tests.
        "test": ["pytest>=8", "triton>=3.2", "pybind11>=2.12", "scikit-learn", "nibabel"],  # pybind11: .ci/cuda_build_check
        "gpu": ["flash-attn", "nvidia-ml-py"],
        "nifti": ["nibabel"],  # .nii / .nii.gz volumes (CT-RATE); .npy / .npz need nothing extra
        "baseline": ["peft>=0.13", "trl>=1.16"],
        "eva": ["timm>=1.0"],  # EVA ViT-g towers (PeFoMed's, mrgfast.models.eva); timm needs torchvision
        "peers": ["liger-kernel"],  # benchmarks/linear_cross_entropy.py compares with it on a GPU
    },
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
