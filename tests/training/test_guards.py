"""NaN/inf loss and gradient detection naming step and batch, stop or skip with a limit, divergence, the checks
before a save; SIGTERM turned into a clean-stop flag."""

import os
import signal

import pytest
import torch

from mrgfast.common.exit_codes import NONFINITE
from mrgfast.training.guards import (DivergenceError, GracefulStop, NonFiniteError, NonFiniteGuard,
                                     NonFiniteLossError, StoppedBySignal, check_finite_loss, max_abs,
                                     nonfinite_names, trainable_state)

NAN, INF = float("nan"), float("inf")


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


def observe(guard, step, loss, norm):
    """One step's loss and gradient norm."""
    guard.observe(torch.tensor(loss), step, [f"s{step}"], torch.tensor(norm))


def test_a_nonfinite_gradient_norm_stops_naming_it():
    guard = NonFiniteGuard(torch.device("cpu"))
    observe(guard, 1, 2.0, 1.0)
    observe(guard, 2, 2.5, INF)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(inf; loss 2.5\) at step 2, batch "
                                                 r"sample ids \[s2\]; the step's update was skipped") as info:
        guard.check()
    assert info.value.exit_code == NONFINITE


def test_skip_goes_on_and_stops_only_past_the_consecutive_limit(capsys):
    guard = NonFiniteGuard(torch.device("cpu"), skip=True, max_consecutive_skips=2)
    for step, loss in enumerate([1.0, NAN, NAN, 1.0, NAN], 1):
        observe(guard, step, loss, 1.0 if loss == loss else NAN)
    assert guard.check() == 3
    assert "skipped 3 step(s) with a non-finite loss or gradient norm, the first at step 2" in capsys.readouterr().err
    observe(guard, 6, NAN, NAN)   # a run of 2 (steps 5 and 6), carried over the check: still within the limit
    assert guard.check() == 4
    observe(guard, 7, NAN, NAN)   # 3 in a row
    with pytest.raises(NonFiniteError, match="3 steps in a row .* guard.max_consecutive_skips=2"):
        guard.check()


def test_zero_gradient_norms_in_a_row_are_divergence():
    stop = NonFiniteGuard(torch.device("cpu"), zero_grad_steps=3)
    for step, norm in enumerate([0.0, 0.0, 1.0, 0.0, 0.0], 1):
        observe(stop, step, 1.0, norm)
    stop.check()  # at most 2 in a row
    observe(stop, 6, 1.0, 0.0)
    with pytest.raises(DivergenceError, match=r"gradient norm was exactly 0 for 3 steps in a row \(up to step 6"):
        stop.check()


def test_weights_nonfinite_always_stop_and_huge_ones_diverge(capsys):
    for skip in (False, True):
        with pytest.raises(NonFiniteError, match="non-finite after step 3"):
            NonFiniteGuard(torch.device("cpu"), skip=skip, max_abs_weight=10.0).check_weights(INF, 3)
    with pytest.raises(DivergenceError, match=r"a trainable weight reached 20 after step 3, above "
                                              r"guard.max_abs_weight=10"):
        NonFiniteGuard(torch.device("cpu"), max_abs_weight=10.0).check_weights(20.0, 3)
    warned = NonFiniteGuard(torch.device("cpu"), skip=True, max_abs_weight=10.0)
    warned.check_weights(20.0, 3)
    warned.check_weights(30.0, 4)
    assert capsys.readouterr().err.count("WARNING: training diverged") == 1
    NonFiniteGuard(torch.device("cpu")).check_weights(1e30, 1)  # max_abs_weight None: off


def test_max_abs_and_nonfinite_names_read_the_state_once():
    a, b = torch.tensor([1.0, -3.0]), torch.tensor([[2.0]])
    assert float(max_abs([a, b], torch.device("cpu"))) == 3.0
    assert float(max_abs([a, torch.tensor([NAN])], torch.device("cpu"))) == INF
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(2)
    optimizer.step()
    optimizer.state[weight]["exp_avg_sq"].fill_(NAN)
    named = list(trainable_state([("w", weight)], optimizer))
    assert [n for n, _ in named] == ["w", "w:step", "w:exp_avg", "w:exp_avg_sq"]
    assert nonfinite_names(named) == ["w:exp_avg_sq"]


def test_a_signal_stop_exits_with_the_shells_code():
    error = StoppedBySignal("SIGTERM", 7, "out/step-000007")
    assert error.exit_code == 143 and "stopped by SIGTERM at step 7 after saving out/step-000007" in str(error)
