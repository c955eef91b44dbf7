"""Data: readers for the formats users already have, learnable synthetic datasets, a finding labeler.

Every reader returns a SampleSet (a list of Sample records with a `stats` Counter); MedicalDataset loads
the images or volumes. The packing collator consumes MedicalDataset items.

Tokens: `load_tokenizer(model_dir)` / `build_demo_tokenizer(texts, out_dir)`; `PromptBuilder(tokenizer, template,
image_tokens=...)` turns samples into ids, answer-only label masks and placeholder spans (templates: TEMPLATES);
`PackingCollator` / `DPOCollator` pack them into fixed [rows, budget] batches (`plan_batches` /
`PackedBatchSampler` group samples that fit); `PackedBatch.dpo_targets()` names the rows DPO's loss reads.
"""

from mrgfast.data.ct import CT_RATE_LABELS, read_ct_reports
from mrgfast.data.dataset import MedicalDataset
from mrgfast.data.errors import BadSampleError, DataFormatError
from mrgfast.data.images import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageConfig, load_image,
                                 preprocess_image)
from mrgfast.data.labeler import CHEXPERT_OBSERVATIONS, binarize, label_report, read_chexpert_csv
from mrgfast.data.packing import (DPOCollator, PackedBatch, PackedBatchSampler, PackingCollator, first_fit_decreasing,
                                  plan_batches, sequence_positions)
from mrgfast.data.preference import read_preference_jsonl
from mrgfast.data.prompts import TEMPLATES, PromptBuilder, PromptTemplate, Span, TokenizedPair, TokenizedSample
from mrgfast.data.r2gen import read_r2gen, read_report_list
from mrgfast.data.samples import Sample, SampleSet
from mrgfast.data.text import clean_report_iu_xray, clean_report_mimic_cxr, pefomed_pre_caption, pefomed_pre_question
from mrgfast.data.tokenizer import Tokenizer, build_demo_tokenizer, load_tokenizer
from mrgfast.data.volumes import VolumeConfig, load_volume, preprocess_volume
from mrgfast.data.vqa import read_slake, read_vqa_rad

__all__ = [
    "BadSampleError", "CHEXPERT_OBSERVATIONS", "CLIP_MEAN", "CLIP_STD", "CT_RATE_LABELS", "DPOCollator",
    "DataFormatError", "IMAGENET_MEAN", "IMAGENET_STD", "ImageConfig", "MedicalDataset", "PackedBatch",
    "PackedBatchSampler", "PackingCollator", "PromptBuilder", "PromptTemplate", "Sample", "SampleSet", "Span",
    "TEMPLATES", "TokenizedPair", "TokenizedSample", "Tokenizer", "VolumeConfig", "binarize", "build_demo_tokenizer",
    "clean_report_iu_xray", "clean_report_mimic_cxr", "first_fit_decreasing", "label_report", "load_image",
    "load_tokenizer", "load_volume", "pefomed_pre_caption", "pefomed_pre_question", "plan_batches",
    "preprocess_image", "preprocess_volume", "read_chexpert_csv", "read_ct_reports", "read_preference_jsonl",
    "read_r2gen", "read_report_list", "read_slake", "read_vqa_rad", "sequence_positions",
]
