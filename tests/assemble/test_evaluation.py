"""Evaluating a run (mrgfast.assemble.evaluation): the report metrics clean text as the run's dataset does in R2Gen."""

import pytest

from mrgfast.assemble.evaluation import metric_cleaning
from mrgfast.config import load_config
from mrgfast.data import clean_report_iu_xray, clean_report_mimic_cxr
from tests.tiny_run import DEMO

MIMIC = ["data.dataset=mimic_cxr", "data.path=/data/mimic/annotation.json", "data.image_dir=/data/mimic/images"]


@pytest.mark.parametrize("overrides, expected", [
    ([], clean_report_iu_xray),  # the synthetic twin is IU-Xray-like
    (["data.dataset=iu_xray", "data.path=/data/iu/annotation.json", "data.image_dir=/data/iu/images"],
     clean_report_iu_xray),
    (MIMIC, clean_report_mimic_cxr),
    (MIMIC + ["data.clean=none"], clean_report_mimic_cxr),  # raw MIMIC text is still scored as R2Gen scores it
    (MIMIC + ["data.clean=iu_xray"], clean_report_iu_xray),  # the run's explicit choice wins
    (["data.clean=mimic_cxr"], clean_report_mimic_cxr),
])
def test_metric_cleaning_is_the_datasets_r2gen_cleaning(overrides, expected):
    assert metric_cleaning(load_config(DEMO, overrides)) is expected


def test_the_two_cleanings_differ_on_raw_mimic_text():
    # Why the choice matters: a line break ends a sentence only under MIMIC-CXR's cleaning.
    raw = "Heart size is normal.\nNo pleural effusion.  No  pneumothorax."
    assert clean_report_mimic_cxr(raw) == "heart size is normal . no pleural effusion . no pneumothorax ."
    assert clean_report_iu_xray(raw) != clean_report_mimic_cxr(raw)
