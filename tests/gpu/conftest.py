"""tests/gpu: CUDA-only training tests, each marked `gpu` here (tests/conftest.py skips those without CUDA)."""

import pytest


def pytest_collection_modifyitems(config, items):
    """Mark every test in this folder `gpu`."""
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
