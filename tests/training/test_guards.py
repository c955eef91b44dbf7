"""NaN/inf loss detection naming step and batch; SIGTERM turned into a clean-stop flag."""

import os
import signal

import pytest
import torch

from mrgfast.training.guards import GracefulStop, NonFiniteGuard, NonFiniteLossError, check_finite_loss


def test_check_finite_loss_names_step_and_batch():
    check_finite_loss(1.5, 3, ["a"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7, batch sample ids \[s1, s2\]"):
        check_finite_loss(float("nan"), 7, ["s1", "s2"])
    with pytest.raises(NonFiniteLossError, match=r"\(-inf\) at step 2"):
        check_finite_loss(float("-inf"), 2, [])


def test_guard_reports_the_first_bad_step_since_last_check():
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.observe(torch.tensor(1.0), 10, ["a"])
    guard.observe(torch.tensor(2.0), 11, ["b"])
    guard.check()  # all finite: no error, history cleared
    guard.observe(torch.tensor(0.5), 12, ["c"])
    guard.observe(torch.tensor(float("inf")), 13, ["d", "e"])
    guard.observe(torch.tensor(float("nan")), 14, ["f"])
    with pytest.raises(NonFiniteLossError) as info:
        guard.check()
    assert (info.value.step, info.value.batch_ids, info.value.value) == (13, ["d", "e"], float("inf"))
    assert "at step 13, batch sample ids [d, e]" in str(info.value)


def test_guard_works_with_bf16_losses_and_long_id_lists():
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.observe(torch.tensor(float("nan"), dtype=torch.bfloat16), 0, list(range(30)))
    with pytest.raises(NonFiniteLossError, match=r"\[0, 1, .*19, \.\.\. \(30 in all\)\]"):
        guard.check()


def test_sigterm_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        # Python runs the handler at the next bytecode boundary; the process is still alive here.
        for _ in range(1000):
            if stop.requested:
                break
        assert stop.requested and stop.reason() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_graceful_stop_needs_main_thread():
    import threading
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, GracefulStop().__enter__)))
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0].value)
