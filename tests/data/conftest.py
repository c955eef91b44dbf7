"""Fixtures for the data tests: a small synthetic demo dataset written once per session."""

import pytest

from mrgfast.data.synthetic import generate_demo
from tests.data.files import DEMO


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small synthetic demo written once: 12 studies (two 64x64 views each), 4 CT volumes of 16^3."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, **DEMO)
    return root
