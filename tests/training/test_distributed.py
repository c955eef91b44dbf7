"""Distributed helpers: single-process no-ops, and a 2-process gloo run matching a 1-process run on the same batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from mrgfast.training.distributed import (DistContext, all_reduce_mean, any_rank, gather_objects, init_distributed,
                                          is_main_process, teardown, wrap_model)
from tests.training import dist_worker


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def test_two_gloo_processes_match_one_process(tmp_path):
    world = 2
    mp.spawn(dist_worker.run, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [load_file(os.path.join(tmp_path, f"rank{r}.safetensors")) for r in range(world)]
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
