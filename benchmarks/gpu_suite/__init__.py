"""The GPU suite: one command that measures the engine on a GPU within a time budget (`python -m benchmarks.gpu_suite`)."""
