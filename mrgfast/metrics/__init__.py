"""Evaluation metrics: report NLG scores (R2Gen's), VQA exact match (PeFoMed's), clinical efficacy, multi-label
classification (AUROC, F1), outputs."""

from mrgfast.metrics.classification import auroc, binary_f1, multilabel_metrics
from mrgfast.metrics.clinical import clinical_metrics, hallucination_rate
from mrgfast.metrics.outputs import generation_rows, write_eval_json, write_generations
from mrgfast.metrics.report import REPORT_METRICS, java_available, report_metrics
from mrgfast.metrics.table import flatten_metrics, format_table
from mrgfast.metrics.vqa import normalize_vqa_answer, vqa_accuracy, vqa_matches

__all__ = [
    "REPORT_METRICS", "auroc", "binary_f1", "clinical_metrics", "flatten_metrics", "format_table",
    "generation_rows", "hallucination_rate", "java_available", "multilabel_metrics", "normalize_vqa_answer",
    "report_metrics", "vqa_accuracy", "vqa_matches", "write_eval_json", "write_generations",
]
