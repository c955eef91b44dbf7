"""Distributed helpers: single-process no-ops, and a 2-process gloo run matching a 1-process run on the same batch."""

import os
import random
import signal
import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from mrgfast.training import distributed
from mrgfast.training.distributed import (DTENSOR_CACHE_CLEARERS, DistContext, all_reduce_mean, any_rank,
                                          cache_clearer, drop_dtensor_caches, gather_objects, init_distributed,
                                          is_main_process, stop_signals_blocked, teardown, wrap_model)
from tests.training import dist_worker


# Ports are drawn below Linux's ephemeral range (32768-60999 by default): a port the kernel hands out (bind to 0)
# can be taken, before the test's store listens on it, by the outgoing connection of another process group's
# store client (a stress run picking 25 ports up front failed that way with EADDRINUSE).
PORT_RANGE = range(20000, 32000)
_handed_out: set = set()
_ports = random.Random(os.getpid())


def free_port() -> int:
    """A TCP port on localhost that is free now, outside the ephemeral range and not handed out before."""
    for _ in range(1000):
        port = _ports.choice(PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")


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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 gloo processes of dist_worker.run saved."""
    world, out = 2, tmp_path_factory.mktemp("two-ranks")
    mp.spawn(dist_worker.run, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return [load_file(os.path.join(out, f"rank{r}.safetensors")) for r in range(world)]


def test_two_gloo_processes_match_one_process(ranks):
    for r, out in enumerate(ranks):
        assert out["mean"].item() == 1.5 and out["sum"].item() == 3.0
        assert out["any"].tolist() == [1.0, 0.0] and out["gather"].tolist() == [0.0, 1.0]
        assert out["main"].item() == float(r == 0)

    x, y = dist_worker.global_batch()
    for tag, micro in (("ddp1", 1), ("ddp2", 2), ("fsdp1", 1)):
        model = dist_worker.make_model()
        # One process on the whole global batch: the equal halves' mean loss is the global mean loss.
        loss, grads = dist_worker.train_step(model, x, y, micro_batches=1)
        for out in ranks:
            torch.testing.assert_close(out[f"{tag}.loss"], loss.reshape(1), rtol=1e-6, atol=1e-7)
            for name, param in model.named_parameters():
                torch.testing.assert_close(out[f"{tag}.grad.{name}"], grads[f"grad.{name}"], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(out[f"{tag}.param.{name}"], param.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_teardown_stops_the_groups_threads(ranks):
    """No gloo or TCP-store thread outlives teardown once the DDP and FSDP models are gone: leftover ones died at
    interpreter exit and aborted a rank now and then."""
    assert [out["communication_threads"].item() for out in ranks] == [0.0, 0.0]


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


def test_sharded_full_state_round_trips_with_uneven_shards(ranks):
    """gather_full_state gives rank 0 the whole weights and AdamW state of an FSDP2 model whose shards are uneven
    (5 and 3 rows over 2 ranks); scatter_full_state puts a whole state back into every rank's shards."""
    reference = {k[len("rt.ref."):]: v for k, v in ranks[0].items() if k.startswith("rt.ref.")}
    assert {"0.weight", "2.bias", "opt.0.exp_avg", "opt.3.exp_avg_sq", "opt.0.step"} <= reference.keys()
    gathered = {k[len("rt.gathered."):]: v for k, v in ranks[0].items() if k.startswith("rt.gathered.")}
    assert gathered.keys() == reference.keys() and not any(k.startswith("rt.gathered.") for k in ranks[1])
    for key, value in reference.items():
        assert torch.equal(gathered[key], value), key
    for out in ranks:
        for key, value in reference.items():
            assert torch.equal(out[f"rt.after.{key}"], 2 * value), key


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

