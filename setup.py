"""Packaging for mrgfast: pure-Python package now, native extension via CMake when CMakeLists.txt exists."""

import os
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
        subprocess.check_call(
            ["cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DPython_EXECUTABLE={sys.executable}", f"-DCMAKE_BUILD_TYPE={config}"],
            cwd=build_dir,
        )
        jobs = str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "--build", ".", "--config", config, "-j", jobs], cwd=build_dir)


def native_extensions():
    """The CMake-built extension mrgfast._C, once the native kernels (CMakeLists.txt) exist."""
    return [CMakeExtension("mrgfast._C")] if (ROOT / "CMakeLists.txt").exists() else []


setup(
    name="mrgfast",
    version="0.1.0",
    description="Fast parameter-efficient fine-tuning of multimodal LLMs for medical report generation",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mrgfast", "mrgfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "pyyaml"],
    extras_require={
        # triton ships with CUDA builds of torch; the CPU wheel needs it for the interpreter tests.
        "test": ["pytest>=8", "triton>=3.2"],
        "gpu": ["flash-attn", "nvidia-ml-py"],
        "baseline": ["peft>=0.13", "trl>=0.12", "transformers>=4.45"],
    },
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
)
