"""Fixtures of the Triton tuner's tests."""

import pytest

from mrgfast.ops.backends.triton import tuning


@pytest.fixture
def tuner_env(monkeypatch, tmp_path):
    """Tuning on, a fresh cache directory, nothing in memory; yields the list every TuningEvent lands in."""
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "on")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning"))
    tuning.forget()
    events = []
    tuning.listeners.append(events.append)
    yield events
    tuning.listeners.remove(events.append)
    tuning.forget()
