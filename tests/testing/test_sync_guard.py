"""no_host_sync: a capturable training step passes; every kind of host synchronisation raises, naming the op."""

import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrgfast.testing.sync_guard import HostSyncError, no_host_sync
from mrgfast.training.guards import NonFiniteGuard
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def test_clean_training_step_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 3))
    opt = build_adamw(model.parameters(), 1e-3, torch.device("cpu"), weight_decay=0.1)
    sched = WarmupSchedule(opt, 10, 2)
    guard = NonFiniteGuard(torch.device("cpu"))
    labels = torch.tensor([0, 2, 1, -100, 2])
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        with no_host_sync():
            logits = model(X)
            # Token-count normalisation kept on the device: no .item() of the count.
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels >= 0).sum()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)
            guard.observe(loss, step, ["a", "b"])
        sched.step()  # outside the captured region, as with CUDA graphs
    guard.check()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


SYNCS = {
    "item": (lambda: X.sum().item(), "aten._local_scalar_dense"),
    "float": (lambda: float(X.sum()), "aten._local_scalar_dense"),
    "int": (lambda: int(X[0, 0]), "aten._local_scalar_dense"),
    "bool": (lambda: bool(X.sum() > 0), "aten._local_scalar_dense"),
    "if": (lambda: 1 if (X > 0).any() else 0, "aten._local_scalar_dense"),
    "python index": (lambda: [1, 2][torch.tensor(1)], "aten._local_scalar_dense"),
    "tolist": (lambda: X.tolist(), "Tensor.tolist"),
    "repr": (lambda: repr(X), "Tensor.tolist"),
    "numpy": (lambda: X.numpy(), "Tensor.numpy"),
    "np.asarray": (lambda: np.asarray(X), "Tensor.numpy"),
    "cpu": (lambda: X.cpu(), "Tensor.cpu"),
    "nonzero": (lambda: X.nonzero(), "aten.nonzero"),
    "where(cond)": (lambda: torch.where(X > 0), "aten.nonzero"),
    "bool mask read": (lambda: X[X > 0], "aten.index"),
    "bool mask write": (lambda: X.clone().__setitem__(X > 0, 0.0), "aten.index_put_"),
    "masked_select": (lambda: X.masked_select(X > 0), "aten.masked_select"),
    "unique": (lambda: torch.unique(X), "aten._unique2"),
    "repeat_interleave": (lambda: X.repeat_interleave(torch.tensor([1, 2, 1, 1, 1]), dim=0),
                          "aten.repeat_interleave"),
    "bincount": (lambda: torch.bincount(torch.tensor([1, 3])), "aten.bincount"),
    "equal": (lambda: torch.equal(X, X), "aten.equal"),
    "allclose": (lambda: torch.allclose(X, X), "aten.allclose"),
    "linalg check": (lambda: torch.linalg.cholesky(torch.eye(2)), "aten._linalg_check_errors"),
    "cuda.synchronize": (lambda: torch.cuda.synchronize(), "torch.cuda.synchronize"),
}


@pytest.mark.parametrize("kind", list(SYNCS))
def test_each_sync_kind_raises_naming_the_op(kind):
    fn, op = SYNCS[kind]
    with pytest.raises(HostSyncError, match=rf"sync-free region: {re.escape(op)} \("):
        with no_host_sync():
            fn()


SYNC_FREE = {
    "integer index": lambda: X[torch.tensor([0, 3])],
    "where(cond, a, b)": lambda: torch.where(X > 0, X, 0.0),
    "masked_fill": lambda: X.masked_fill(X > 0, 0.0),
    "nonzero_static": lambda: X.nonzero_static(size=4),
    "repeat_interleave with output_size": lambda: X.repeat_interleave(torch.tensor([1, 2, 1, 1, 1]), dim=0,
                                                                       output_size=6),
    "int repeats": lambda: X.repeat_interleave(2, dim=0),
    "to(cpu) of a cpu tensor": lambda: X.to("cpu"),
    "isclose().all()": lambda: torch.isclose(X, X).all(),
}


@pytest.mark.parametrize("kind", list(SYNC_FREE))
def test_sync_free_alternatives_pass(kind):
    with no_host_sync():
        SYNC_FREE[kind]()


class SyncInBackward(torch.autograd.Function):
    """Identity whose backward reads a value on the host."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad.abs().max().item()
        return grad


def test_sync_in_backward_raises():
    x = X.clone().requires_grad_()
    with pytest.raises(HostSyncError, match="aten._local_scalar_dense"):
        with no_host_sync():
            SyncInBackward.apply(x).sum().backward()


def test_allow_list_and_cleanup():
    originals = (Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.to, torch.cuda.synchronize)
    with no_host_sync(allow=("aten.nonzero", "Tensor.tolist")):
        X.nonzero()
        X[:1, :1].tolist()
        with pytest.raises(HostSyncError, match="aten._local_scalar_dense"):
            X.sum().item()
    # Outside the block everything works again and the patched methods are the originals.
    assert X[:1, :1].tolist() == [[X[0, 0].item()]]
    assert (Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.to, torch.cuda.synchronize) == originals


def test_other_threads_are_not_guarded():
    results = []
    entered, done = threading.Event(), threading.Event()

    def worker():
        entered.wait(5)
        results.append((X.sum().item(), X[:1, :1].tolist(), X.cpu().shape))
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with no_host_sync():
        entered.set()
        assert done.wait(5)
    thread.join()
    assert len(results) == 1


def test_nested_guards_need_every_allowance():
    with no_host_sync(allow=("Tensor.tolist", "aten.nonzero")):
        with no_host_sync(allow=("Tensor.tolist",)):
            X[:1, :1].tolist()
            with pytest.raises(HostSyncError, match="aten.nonzero"):
                X.nonzero()
        X.nonzero()  # the inner region has ended
