"""Learnable synthetic medical datasets (the embedded demo): chest X-rays, reports, VQA, preference pairs, CT."""

from mrgfast.data.synthetic.demo import DEMO_PARTS, demo_samples, generate_demo, read_manifest
from mrgfast.data.synthetic.findings import Findings, hallucinate_one, sample_findings

__all__ = ["DEMO_PARTS", "Findings", "demo_samples", "generate_demo", "hallucinate_one", "read_manifest",
           "sample_findings"]
