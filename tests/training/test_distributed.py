"""Distributed helpers in one process: no-ops without torchrun, bad environments and arguments named, the DTensor cache
clearers, signal masks of communication threads. The 2-process gloo runs are in
tests/integration/test_two_process_collectives.py."""

import signal
import threading

import pytest
import torch
from torch import nn

from mrgfast.training import distributed
from mrgfast.training.distributed import (DTENSOR_CACHE_CLEARERS, DistContext, all_reduce_mean, any_rank,
                                          cache_clearer, drop_dtensor_caches, gather_objects, init_distributed,
                                          is_main_process, stop_signals_blocked, teardown, wrap_model)


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main, ctx.device) == (0, 1, False, True,
                                                                                   torch.device("cpu"))
    model = nn.Linear(2, 2)
    assert wrap_model(model, ctx, "ddp") is model and wrap_model(model, ctx, "fsdp") is model
    values = {"loss": torch.tensor(3.0)}
    assert all_reduce_mean(ctx, values) is values
    assert any_rank(ctx, True) and not any_rank(ctx, False)
    assert gather_objects(ctx, {"a": 1}) == [{"a": 1}]
    assert is_main_process()
    teardown(ctx)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent torchrun environment"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": None, "MASTER_PORT": None}, "MASTER_ADDR is not set"),
])
def test_bad_environment_is_named(monkeypatch, env, message):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_distributed(device="cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of auto, nccl, gloo"):
        init_distributed(backend="mpi")
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp"):
        wrap_model(nn.Linear(1, 1), DistContext(), "zero3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            init_distributed(device="cuda")


def test_every_dtensor_cache_clearer_exists_in_this_torch():
    assert all(callable(cache_clearer(module, name)) for module, name in DTENSOR_CACHE_CLEARERS)
    assert cache_clearer("torch.distributed.tensor._no_such_module", "clear") is None
    assert cache_clearer("torch.distributed.tensor.debug", "_clear_sharding_prop_cache.no_such_attribute") is None


def test_a_cache_clearer_this_torch_lacks_is_named_in_a_warning_and_the_others_still_run(monkeypatch):
    import torch.distributed.tensor.debug as dtensor_debug  # also puts torch.distributed.tensor in sys.modules
    calls = []
    monkeypatch.setattr(dtensor_debug, "_clear_sharding_prop_cache", lambda: calls.append("cleared"))
    monkeypatch.setattr(distributed, "DTENSOR_CACHE_CLEARERS",
                        (("torch.distributed.tensor.debug", "_renamed_cache_clear"),
                         ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache")))
    with pytest.warns(RuntimeWarning, match=r"torch\.distributed\.tensor\.debug\._renamed_cache_clear"):
        drop_dtensor_caches()
    assert calls == ["cleared"]


def blocked_signals() -> set:
    """The calling thread's blocked signals."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_threads_started_while_stop_signals_are_blocked_never_receive_them():
    before, seen = blocked_signals(), {}
    with stop_signals_blocked():
        worker = threading.Thread(target=lambda: seen.update(mask=blocked_signals()))
        worker.start()
        worker.join()
    assert {signal.SIGTERM, signal.SIGINT} <= seen["mask"]  # a communication thread's mask
    assert blocked_signals() == before and signal.SIGTERM not in before  # the main thread's mask is restored
