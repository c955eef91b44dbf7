"""Distributed helpers in 2 gloo processes (tests/integration/dist_worker.run): collectives, DDP and FSDP2 steps
matching a 1-process run on the same batch, sharded full-state gather and scatter, no thread left after teardown."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.integration import dist_worker
from tests.integration.dist_worker import free_port


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
