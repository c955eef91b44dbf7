"""The native backend: each module calls mrgfast._C's C++ kernels for CPU tensors and its CUDA kernels for CUDA ones."""
