"""The Triton backend: each module holds one op's kernels and their ahead-of-time compile specs (aot.py)."""
