"""tests/integration: whole runs (the demo, every recipe, 2-process training, the training CLI under SIGTERM), each
test marked `integration` here: `python -m pytest -m "not integration"` is the fast unit run, `-m integration` these
alone, and `python -m pytest` runs both."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects by markers
def pytest_collection_modifyitems(config, items):
    """Mark every test collected under tests/integration `integration`."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
