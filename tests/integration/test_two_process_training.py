"""Training in 2 gloo processes: DDP and FSDP2 match one process on the same global batch, the FSDP2 command line
leaves no process-group thread behind, and evaluation during training runs on rank 0 only."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from mrgfast.config import config_to_dict
from mrgfast.train import train
from tests.integration.dist_worker import cli_worker, free_port, gloo_worker, run_two_ranks, train_runs
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import DEMO, EVAL, eval_lines, tiny, tiny_overrides, tiny_with_eval, trained_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_PROCESS = ["schedule.max_steps=2", "checkpoint.every_steps=100", "optim.lr=1e-2", "device=cpu",
               "distributed.timeout_s=120"]  # a stuck collective fails the test instead of hanging it


def test_two_processes_ddp_and_fsdp2_match_one_process(cache, tmp_path):
    """Same global batch: 1 process x 2 accumulated micro-batches == 2 gloo processes x 1 (DDP, then FSDP2)."""
    single = train(tiny(cache, tmp_path / "one", *TWO_PROCESS, "optim.grad_accum_steps=2"))
    ddp = tiny(cache, tmp_path / "ddp", *TWO_PROCESS, "distributed.strategy=ddp")
    fsdp = tiny(cache, tmp_path / "fsdp", *TWO_PROCESS, "distributed.strategy=fsdp")
    runs = run_two_ranks(gloo_worker, [free_port(), free_port()], [config_to_dict(ddp), config_to_dict(fsdp)])
    expected = [r["loss"] for r in single.history]
    for rank in (0, 1):
        (ddp_losses, ddp_sharded, _), (fsdp_losses, fsdp_sharded, trainable_sharded) = runs[rank]
        assert ddp_losses == pytest.approx(expected, rel=1e-5) and fsdp_losses == pytest.approx(expected, rel=1e-5)
        # FSDP2 shards the frozen base and leaves the trainable weights whole; DDP shards nothing.
        assert ddp_sharded == 0 and fsdp_sharded > 0 and not trainable_sharded
    a = trained_tensors(single.checkpoint)
    for run in ("ddp", "fsdp"):
        b = trained_tensors(tmp_path / run / "step-000002")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{run}: {key}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_two_process_fsdp_cli_stops_the_groups_threads_before_it_returns(cache, tmp_path):
    """The FSDP2 model keeps the group alive in reference cycles; main() collects them, so no gloo or TCP-store
    thread is left running into interpreter shutdown (where such threads aborted a rank now and then)."""
    argv = [f"config={DEMO}", *tiny_overrides(cache), *TWO_PROCESS, f"output_dir={tmp_path}",
            "distributed.strategy=fsdp"]
    runs = run_two_ranks(cli_worker, free_port(), argv)
    assert runs == {0: (0, []), 1: (0, [])}
    assert (tmp_path / "step-000002").is_dir()


def test_two_ddp_processes_evaluate_on_rank_0_only(cache, tmp_path):
    # Rank 1 waits at the barrier while rank 0 evaluates: both finish, and each evaluation is written once.
    train(tiny_with_eval(cache, tmp_path / "warm"))  # writes the synthetic twin before the spawned processes read it
    config = config_to_dict(tiny_with_eval(cache, tmp_path / "ddp", "device=cpu", "distributed.timeout_s=120",
                                           "eval.every_steps=2", *EVAL))
    mp.spawn(train_runs, args=(2, [free_port()], [(config, None)], str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"train-rank{r}.json").read_text()) for r in range(2)]
    assert [report[0]["step"] for report in reports] == [4, 4]
    assert [line["step"] for line in eval_lines(tmp_path / "ddp")] == [2, 4]
