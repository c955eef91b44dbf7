"""`python -m mrgfast.train` as a real process: SIGTERM makes it save a checkpoint and exit 143 (not finished)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mrgfast.training.checkpoint import read_checkpoint
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import DEMO, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sigterm_to_the_cli_process_saves_and_exits_143(cache, tmp_path):
    args = [sys.executable, "-m", "mrgfast.train", f"config={DEMO}", *tiny_overrides(cache),
            f"output_dir={tmp_path}", "schedule.max_steps=100000", "checkpoint.every_steps=100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # so `train && evaluate` stops: the run is not finished
    assert "SIGTERM received at step" in err and "mrgfast.train: stopped by SIGTERM at step" in err
    assert "finished" not in out
    saved = sorted(tmp_path.glob("step-*"))
    assert len(saved) == 1 and read_checkpoint(saved[0]).step == int(saved[0].name.split("-")[1]) >= 2
