"""tests/gpu: CUDA-only tests, skipped (with the reason) on machines without a CUDA device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Mark every test here `gpu` and skip it when CUDA is absent: the one environment limit these have."""
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
