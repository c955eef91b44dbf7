"""FSDP2 with sharded trainable weights and AdamW state (distributed.shard_trainable): 2 gloo processes match one
process on the same global batch, resume exactly, and write checkpoints in the one-process format (optimizer
state included) that resume in one process."""

import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from mrgfast.config import config_to_dict
from mrgfast.train import train
from mrgfast.training.checkpoint import read_checkpoint
from tests.integration import dist_worker
from tests.integration.dist_worker import free_port
from tests.tiny_run import logged, tiny, trained_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 4  # checkpoints at 2 and 4: a resume point and the end
COMMON = [f"schedule.max_steps={STEPS}", "checkpoint.every_steps=2", "optim.lr=1e-2", "device=cpu",
          "optim.max_grad_norm=0.1",  # below the tiny run's gradient norms (~0.16): clipping scales every step
          "distributed.timeout_s=120"]  # a stuck collective fails the test instead of hanging it
SHARDED = COMMON + ["distributed.strategy=fsdp", "distributed.shard_trainable=true"]
DROPOUT = ["lora.lora_dropout=0.1"]  # the resume test: the restored RNG state matters
# The same global batch of 4 micro-batches: accumulated in one process, 2 a rank (FSDP2's no-sync path) in two.
ONE_ACCUM, TWO_ACCUM = ["optim.grad_accum_steps=4"], ["optim.grad_accum_steps=2"]
# The existing FSDP test's tolerances (tests/integration/test_two_process_training.py): float sums in another order.
LOSS_REL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (4 accumulated micro-batches) and, in one 2-process gloo group: a run to STEPS (2 micro-batches
    a rank), a run with dropout to STEPS, and the same split by SIGTERM at step 2 + resume=auto."""
    cache, root = tmp_path_factory.mktemp("synthetic-cache"), tmp_path_factory.mktemp("sharded")
    # The one-process run first: it also generates the synthetic twin the spawned processes then read.
    single = train(tiny(cache, root / "one", *COMMON, *ONE_ACCUM))
    plan = [(root / "two", SHARDED + TWO_ACCUM, None), (root / "straight", SHARDED + DROPOUT, None),
            (root / "split", SHARDED + DROPOUT, 2), (root / "split", SHARDED + DROPOUT + ["resume=auto"], None)]
    configs = [(config_to_dict(tiny(cache, out, *extra)), stop_at) for out, extra, stop_at in plan]
    ports = [free_port() for _ in plan]
    mp.spawn(dist_worker.train_runs, args=(WORLD, ports, configs, str(root)), nprocs=WORLD, join=True)
    reports = [json.loads((root / f"train-rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "cache": cache, "single": single, "reports": reports}


def assert_close_weights(a: dict, b: dict, label: str) -> None:
    """Same keys, and values equal within the FSDP test's tolerance."""
    assert a.keys() == b.keys(), label
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=f"{label}: {key}")


def test_sharded_two_processes_match_one_process(runs):
    expected = [r["loss"] for r in runs["single"].history]
    assert len(expected) == STEPS
    for report in runs["reports"]:
        two = report[0]
        assert two["step"] == STEPS and two["trainable_sharded"]  # LoRA and the projector were DTensors
        assert two["losses"] == pytest.approx(expected, rel=LOSS_REL)
    # clip_grad_norm_ on the sharded (DTensor) gradients: the global norm, as one process has it.
    single_norms = [r["grad_norm"] for r in runs["single"].history]
    assert min(single_norms) > 0.1
    assert [r["grad_norm"] for r in logged(runs["root"] / "two")] == pytest.approx(single_norms, rel=LOSS_REL)
    a, b = trained_tensors(runs["single"].checkpoint), trained_tensors(runs["root"] / "two" / "step-000004")
    assert_close_weights(a, b, "sharded 2 processes vs 1 process")
    earlier = trained_tensors(runs["root"] / "two" / "step-000002")
    assert not any(torch.equal(b[key], earlier[key]) for key in b)  # every weight trained between the checkpoints


def test_sharded_resume_is_exact(runs):
    root = runs["root"]
    for straight, first, resumed in (report[1:] for report in runs["reports"]):
        assert first["stopped"] and first["step"] == 2 and resumed["step"] == STEPS
        assert first["losses"] + resumed["losses"] == straight["losses"]
    assert [r["loss"] for r in logged(root / "split")] == [r["loss"] for r in logged(root / "straight")]
    a, b = trained_tensors(root / "straight" / "step-000004"), trained_tensors(root / "split" / "step-000004")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = read_checkpoint(root / "straight" / "step-000004").optimizer
    sb = read_checkpoint(root / "split" / "step-000004").optimizer
    for index, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][index][name]), (index, name)


def assert_same_optimizer_format(one: dict, two: dict) -> None:
    """The same param numbering, groups and per-parameter state names and shapes; moments close in value (equal
    shapes alone would not catch two same-shaped LoRA matrices numbered the other way round)."""
    assert list(one["state"]) == list(two["state"]) == list(range(len(one["state"])))
    assert [g["params"] for g in one["param_groups"]] == [g["params"] for g in two["param_groups"]]
    for g1, g2 in zip(one["param_groups"], two["param_groups"]):
        assert g1.keys() == g2.keys()
        for key, value in g1.items():
            if isinstance(value, torch.Tensor):  # the tensor LR
                assert torch.equal(value, g2[key]), key
            else:
                assert value == g2[key], key
    for index, state in one["state"].items():
        assert state.keys() == two["state"][index].keys()
        for name, value in state.items():
            other = two["state"][index][name]
            assert (other.shape, other.dtype) == (value.shape, value.dtype), (index, name)
            scale = value.abs().max().item()
            torch.testing.assert_close(other, value, rtol=1e-3, atol=1e-3 * scale, msg=f"{index}.{name}")


def test_sharded_checkpoint_has_one_process_format_and_resumes_in_one_process(runs):
    root, cache = runs["root"], runs["cache"]
    one, two = read_checkpoint(runs["single"].checkpoint), read_checkpoint(root / "two" / "step-000004")
    assert one.tensors.keys() == two.tensors.keys()
    for group in one.tensors:
        assert {k: v.shape for k, v in one.tensors[group].items()} == \
               {k: v.shape for k, v in two.tensors[group].items()}
    assert_same_optimizer_format(one.optimizer, two.optimizer)
    assert one.scheduler == two.scheduler and one.sampler == two.sampler and len(two.rng_states) == WORLD
    adapter_one, adapter_two = one.path / "adapter", two.path / "adapter"
    assert sorted(p.name for p in adapter_one.iterdir()) == sorted(p.name for p in adapter_two.iterdir())
    assert (adapter_one / "adapter_config.json").read_text() == (adapter_two / "adapter_config.json").read_text()
    # The 2-process checkpoint at step 2 resumes in one process (same global batch) and ends where 2 processes do.
    out = root / "one-from-two"
    out.mkdir()
    shutil.copytree(root / "two" / "step-000002", out / "step-000002")
    resumed = train(tiny(cache, out, *COMMON, *ONE_ACCUM, "resume=auto"))
    assert resumed.step == STEPS
    two_losses = runs["reports"][0][0]["losses"]
    assert [r["loss"] for r in logged(out)] == pytest.approx(two_losses[2:], rel=LOSS_REL)
    assert_close_weights(trained_tensors(root / "two" / "step-000004"), trained_tensors(resumed.checkpoint),
                         "1 process resumed from the sharded checkpoint")
