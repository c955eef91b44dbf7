"""mrgfast.demo.base_models without pretraining anything: the settings type is checked, and the rendered pretraining
views' targets follow the findings. (Pretrained base models: tests/integration/test_demo.py.)"""

import pytest
import torch

from mrgfast.demo import base_models
from mrgfast.demo.base_models import FAST_SETTINGS, prepare_base_models


def test_settings_must_be_base_model_settings(tmp_path):
    """A settings object of the wrong type is refused before anything is written."""
    with pytest.raises(TypeError, match="BaseModelSettings"):
        prepare_base_models(tmp_path, 0, settings={"n_studies": 3})
    assert not any(tmp_path.iterdir())


def test_rendered_views_targets_follow_the_findings():
    """Rendered pretraining studies: frontal targets are the study's labels, laterals keep only the unsided ones."""
    settings = FAST_SETTINGS
    pixels, frontal, lateral, mask = base_models.rendered_views(6, 0, settings, base_models.demo_image_config(settings))
    assert pixels.shape == (6, 2, 1, settings.vit_input, settings.vit_input)
    assert torch.equal(lateral, frontal * mask)
    assert [name for name, m in zip(base_models.VIT_TARGETS, mask) if m] == list(base_models.LATERAL_TARGETS)
    assert torch.equal(frontal[:, 5], frontal[:, 1].maximum(frontal[:, 2]))  # effusion = left or right
