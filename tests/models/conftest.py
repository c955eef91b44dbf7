"""Fixtures for the model tests: tiny random HF models saved once per session."""

import pytest
import torch

from tests.models.tiny_hf import BUILDERS


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name) -> (HF model in eval mode, directory it was saved to); built once per session, never
    mutated by tests."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            model = BUILDERS[name]().eval()
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (model, path)
        return built[name]
    return get

