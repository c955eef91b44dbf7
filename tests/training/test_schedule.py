"""LR schedule equals transformers' schedulers; tensor LRs are updated in place; AdamW builder."""

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup)

from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule

# The reference schedulers are stepped without optimizer steps in the comparisons below, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def sgd(lrs=(0.1, 0.03)):
    """An SGD optimizer with one param group per base LR."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


@pytest.mark.parametrize("warmup, total, cycles", [(0, 10, 0.5), (3, 17, 0.5), (5, 5, 0.5), (2, 11, 1.5)])
def test_cosine_equals_transformers(warmup, total, cycles):
    ref_opt, opt = sgd(), sgd()
    ref = get_cosine_schedule_with_warmup(ref_opt, warmup, total, num_cycles=cycles)
    ours = WarmupSchedule(opt, total, warmup, num_cycles=cycles)
    for _ in range(total + 3):  # past the end too
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        assert ours.get_last_lr() == ref.get_last_lr()
        ref.step()
        ours.step()


def test_min_lr_and_constant_equal_transformers():
    ref_opt, opt = sgd(), sgd()
    ref = get_cosine_with_min_lr_schedule_with_warmup(ref_opt, 2, 9, min_lr_rate=0.1)
    ours = WarmupSchedule(opt, 9, 2, min_lr_rate=0.1)
    ref_c_opt, c_opt = sgd(), sgd()
    ref_c = get_constant_schedule_with_warmup(ref_c_opt, 3)
    ours_c = WarmupSchedule(c_opt, 9, 3, name="constant")
    for _ in range(10):
        assert ours.get_last_lr() == ref.get_last_lr()
        assert ours_c.get_last_lr() == ref_c.get_last_lr()
        for s in (ref, ours, ref_c, ours_c):
            s.step()


def test_tensor_lr_updated_in_place_and_used_by_fused_adamw():
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(6, 4))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref_opt = torch.optim.AdamW([p_ref], lr=0.05, weight_decay=0.0, foreach=False)
    ref = get_cosine_schedule_with_warmup(ref_opt, 2, 8)
    opt = build_adamw([p], 0.05, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32
    ours = WarmupSchedule(opt, 8, 2)
    for step in range(8):
        assert opt.param_groups[0]["lr"] is lr  # the same memory every step (what a CUDA graph captured)
        assert lr.item() == torch.tensor(ref.get_last_lr()[0], dtype=torch.float32).item()
        grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        p_ref.grad, p.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()
        ref.step()
        ours.step()
    # Fused kernel and fp32 LR vs the per-parameter loop and a double LR: equal up to rounding.
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)


def test_param_groups_get_their_own_lr_tensors():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_adamw([{"params": [a]}, {"params": [b], "lr": 0.5}], 0.1, torch.device("cpu"))
    sched = WarmupSchedule(opt, 4, 0)
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] is not lrs[1]
    assert [v.item() for v in lrs] == pytest.approx(sched.get_last_lr())


def test_state_dict_round_trip_and_errors():
    opt = sgd()
    sched = WarmupSchedule(opt, 10, 2)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    other_opt = sgd()
    other = WarmupSchedule(other_opt, 10, 2)
    other.load_state_dict(state)
    assert other.last_step == 4 and [g["lr"] for g in other_opt.param_groups] == sched.get_last_lr()
    with pytest.raises(ValueError, match="missing last_step"):
        other.load_state_dict({k: v for k, v in state.items() if k != "last_step"})
    with pytest.raises(ValueError, match="2 base LRs, the optimizer has 1"):
        WarmupSchedule(sgd((0.1,)), 10, 2).load_state_dict(state)


def test_continue_from_takes_the_position_and_keeps_the_own_settings():
    """An extended cosine goes on along the longer schedule: as if set so from the start, never climbing again."""
    short = WarmupSchedule(sgd((0.1,)), 4)
    for _ in range(4):
        short.step()
    assert short.get_last_lr() == [pytest.approx(0.0)]
    longer_opt = sgd((0.1,))
    longer, straight = WarmupSchedule(longer_opt, 8), WarmupSchedule(sgd((0.1,)), 8)
    longer.continue_from(short.state_dict())
    assert longer.last_step == 4 and longer.total_steps == 8
    for _ in range(4):
        straight.step()
    lrs = []
    for _ in range(4):
        assert longer.get_last_lr() == straight.get_last_lr() == [longer_opt.param_groups[0]["lr"]]
        lrs.append(longer.get_last_lr()[0])
        longer.step()
        straight.step()
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0
    with pytest.raises(ValueError, match="missing last_step"):
        longer.continue_from({k: v for k, v in short.state_dict().items() if k != "last_step"})
    climbing = WarmupSchedule(sgd((0.1,)), 4)
    climbing.last_step = 6  # what load_state_dict of the short schedule left an extended run with
    assert climbing.multiplier() > climbing.multiplier(5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0, warmup_steps=0), "total_steps >= 1"),
    (dict(total_steps=5, warmup_steps=6), "warmup_steps <= total_steps"),
    (dict(total_steps=5, name="linear"), "schedule name must be one of cosine, constant"),
    (dict(total_steps=5, min_lr_rate=2.0), "min_lr_rate must be in"),
])
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupSchedule(sgd(), **kwargs)


def test_build_adamw_arguments():
    p = torch.nn.Parameter(torch.zeros(2))
    plain = build_adamw([p], 0.1, torch.device("cpu"), fused=False)
    assert plain.param_groups[0]["lr"] == 0.1 and not plain.param_groups[0]["fused"]
    assert build_adamw([p], 0.1, torch.device("cpu")).param_groups[0]["fused"]
    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        build_adamw([p], 0.1, torch.device("cpu"), fused="yes")
    with pytest.raises(ValueError, match="lr must be > 0"):
        build_adamw([p], 0.0, torch.device("cpu"))
