"""Benchmarks of mrgfast against the eager baseline; each script writes one JSON report (see README.md)."""
