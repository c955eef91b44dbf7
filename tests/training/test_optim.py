"""step_unless: a step with the flag set changes nothing (weights, moments, step counts), on the device, for fused
AdamW and for any other optimizer; hyperparameters kept over a load_state_dict."""

import copy

import pytest
import torch

from mrgfast.testing.sync_guard import no_host_sync
from mrgfast.training.optim import build_adamw, hyperparameters, is_fused, keep_hyperparameters, step_unless
from mrgfast.training.state_io import same_state


def optimizers():
    """(name, fresh parameter, its optimizer) for fused AdamW, the per-parameter AdamW and SGD with momentum."""
    for name in ("fused", "plain", "sgd"):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        if name == "sgd":
            optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
        else:
            optimizer = build_adamw([weight], 0.1, torch.device("cpu"), fused=name == "fused" and "auto")
        yield name, weight, optimizer


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_flagged_step_changes_nothing_and_a_clear_one_steps(index):
    name, weight, optimizer = list(optimizers())[index]
    assert is_fused(optimizer) == (name == "fused")
    weight.grad = torch.ones_like(weight)
    step_unless(optimizer, torch.zeros(()))  # a first real step: the state exists
    before = copy.deepcopy((weight.detach().clone(), optimizer.state_dict()))
    weight.grad = torch.full_like(weight, float("nan"))
    context = no_host_sync() if name == "fused" else torch.no_grad()
    with context:
        step_unless(optimizer, torch.ones(()))
    assert same_state((weight.detach().clone(), optimizer.state_dict()), before)
    weight.grad = torch.ones_like(weight)
    step_unless(optimizer, torch.zeros(()))
    assert not torch.equal(weight.detach(), before[0])


def test_a_flagged_first_step_leaves_the_state_as_a_fresh_one():
    _, weight, optimizer = list(optimizers())[1]  # the per-parameter AdamW creates its state on the first step
    start = weight.detach().clone()
    weight.grad = torch.full_like(weight, float("inf"))
    step_unless(optimizer, torch.ones(()))
    state = optimizer.state[weight]
    assert torch.equal(weight.detach(), start) and float(state["step"]) == 0
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_hyperparameters_survive_a_load_state_dict():
    weight = torch.nn.Parameter(torch.ones(2))
    old = build_adamw([weight], 0.1, torch.device("cpu"), weight_decay=0.0, eps=1e-8)
    new = build_adamw([weight], 0.1, torch.device("cpu"), weight_decay=0.5, eps=1e-6)
    kept = hyperparameters(new)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["weight_decay"] == 0.0  # what load_state_dict does on its own
    keep_hyperparameters(new, kept)
    assert (new.param_groups[0]["weight_decay"], new.param_groups[0]["eps"]) == (0.5, 1e-6)
