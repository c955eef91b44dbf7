"""The training loop (mrgfast.train.train) on the tiny synthetic twin: learning, accumulation == one big batch,
clipping, checkpoints, exact resume, SIGTERM, NaN stop, a sync-free step, the vision-feature cache, telemetry; on
CUDA, a run with cuda_graphs replays its steps. The 2-process and CLI-signal runs are in tests/integration."""

import copy
import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mrgfast.assemble import build_all
from mrgfast.config import config_to_dict
from mrgfast.data.packing import PackingCollator
from mrgfast.data.static_batch import StaticShape, make_static
from mrgfast.testing.sync_guard import no_host_sync
from mrgfast.train import train
from mrgfast.training.checkpoint import read_checkpoint
from mrgfast.training.cuda_graph import signature
from mrgfast.training.guards import NonFiniteError, NonFiniteLossError
from mrgfast.training.steps import MicroBatch, StepSettings, prepare, sft_loss, supervised_tokens, train_step
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import host_batches, logged, tiny, tiny_cuda, trained_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_learns_and_writes_config_and_telemetry(cache, tmp_path):
    config = tiny(cache, tmp_path, "optim.lr=5e-2", "schedule.max_steps=8", "schedule.name=constant",
                  "checkpoint.every_steps=100", "data.rows=2")
    result = train(config)
    records = logged(tmp_path)
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu"):
        assert key in records[-1]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(config)
    assert result.step == 8 and result.checkpoint == tmp_path / "step-000008"
    assert result.metrics["loss"] == losses[-1]


def test_accumulation_equals_one_big_batch_and_clipping(cache, tmp_path):
    config = tiny(cache, tmp_path, "data.shuffle=false", "optim.max_grad_norm=null")
    pieces = build_all(config, torch.device("cpu"))
    model = pieces.model
    start = copy.deepcopy(model.state_dict())
    small, groups = host_batches(pieces, 2)
    big_collator = PackingCollator(config.data.token_budget, rows=2, builder=pieces.builder)
    big = big_collator([pieces.dataset[i] for g in groups for i in g])
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batches, max_norm=None):
        """One SGD(lr=1) train_step from the start weights; (outputs, trainable weights after)."""
        model.load_state_dict(start)
        optimizer = torch.optim.SGD(params, lr=1.0)
        norm = torch.tensor(float(sum(supervised_tokens(b) for b in batches)))
        micros = [MicroBatch(prepare(copy.deepcopy(b), "cpu"), norm, torch.ones(())) for b in batches]
        out = train_step(model, optimizer, micros, StepSettings(max_grad_norm=max_norm), params)
        return out, [p.detach().clone() for p in params]

    (out_acc, after_acc), (out_big, after_big) = step(small), step([big])
    torch.testing.assert_close(out_acc["loss"], out_big["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(after_acc, after_big):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Clipping: the reported norm is the unclipped one; SGD(lr=1) then moves the weights by exactly max_norm.
    before = [start[n] for n, p in model.named_parameters() if p.requires_grad]
    out_clip, after_clip = step(small, max_norm=1e-3)
    torch.testing.assert_close(out_clip["grad_norm"],
                               torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after_acc, before))),
                               rtol=1e-4, atol=0)
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after_clip, before)))
    torch.testing.assert_close(moved, torch.tensor(1e-3), rtol=1e-3, atol=0)


def static_shape(pieces) -> StaticShape:
    """The run's static shape, as train() builds it for CUDA graphs."""
    return StaticShape.for_lengths(pieces.packed.lengths, pieces.packed.budget, pieces.packed.rows)


def test_eager_batches_trimmed_and_head_on_supervised_rows_equal_static_shapes(cache, tmp_path):
    config = tiny(cache, tmp_path, "data.shuffle=false", "data.rows=2")
    pieces = build_all(config, torch.device("cpu"))
    model = pieces.model.eval()  # no dropout: both calls see the same network
    (host,), _ = host_batches(pieces, 1)
    norm = torch.tensor(float(supervised_tokens(host)))
    gathered = prepare(copy.deepcopy(host), "cpu")
    every_row = prepare(copy.deepcopy(host), "cpu", static_shape(pieces))
    assert every_row.loss_rows is None and 0 < gathered.loss_rows.index.numel() < host.labels.numel()
    assert every_row.input_ids.shape == host.input_ids.shape and not every_row.layout.seg_q.on_host
    assert gathered.input_ids.shape[1] == max(int(r.nonzero()[-1]) + 1 for r in host.sample_index >= 0)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (gathered, every_row):
        loss = sft_loss(model, MicroBatch(batch, norm, torch.ones(())))
        results.append((loss, torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["sft", "dpo", "sft-static"])
def test_step_is_host_sync_free(cache, tmp_path, mode):
    config = tiny(cache, tmp_path, f"mode={mode.split('-')[0]}", "optim.grad_accum_steps=2")
    pieces = build_all(config, torch.device("cpu"))
    params = [p for p in pieces.model.parameters() if p.requires_grad]
    batches, _ = host_batches(pieces, 2)
    counts = [supervised_tokens(b) if mode != "dpo" else (b.dpo_cu_seqlens.numel() - 1) // 2 for b in batches]
    norm = torch.tensor(float(sum(counts)))
    shape = static_shape(pieces) if mode == "sft-static" else None
    micros = [MicroBatch(prepare(b, "cpu", shape), norm, torch.tensor(c / sum(counts)))
              for b, c in zip(batches, counts)]
    mode = mode.split("-")[0]
    with no_host_sync():
        out = train_step(pieces.model, pieces.optimizer, micros, StepSettings(mode=mode), params)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["grad_norm"])


def test_static_batches_of_different_layouts_share_one_graph_signature(cache, tmp_path):
    config = tiny(cache, tmp_path, "data.shuffle=false", "data.rows=2")
    pieces = build_all(config, torch.device("cpu"))
    batches, _ = host_batches(pieces, 4)
    assert len({tuple(b.cu_seqlens.tolist()) for b in batches}) > 1  # the layouts do differ
    shape = static_shape(pieces)
    static = [prepare(copy.deepcopy(b), "cpu", shape) for b in batches]
    assert len({signature(b) for b in static}) == 1  # so a captured graph replays for every one of them
    assert len({signature(prepare(copy.deepcopy(b), "cpu")) for b in batches}) > 1  # eager batches differ
    with pytest.raises(ValueError, match="more than max_samples=1 of its static shape"):
        make_static(batches[0], StaticShape(max_documents=64, max_samples=1))
    with pytest.raises(ValueError, match="more than max_documents=1 of its static shape"):
        make_static(batches[0], StaticShape(max_documents=1, max_samples=64))
    dpo = build_all(tiny(cache, tmp_path / "dpo", "mode=dpo"), torch.device("cpu"))
    (pairs,), _ = host_batches(dpo, 1)
    with pytest.raises(ValueError, match="make_static takes SFT batches only"):
        make_static(pairs, shape)


def test_checkpoints_every_n_and_at_end(cache, tmp_path):
    result = train(tiny(cache, tmp_path, "schedule.max_steps=5", "checkpoint.every_steps=2",
                        "checkpoint.keep_last=2"))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004", "step-000005"]
    ckpt = read_checkpoint(result.checkpoint)
    adapter = tmp_path / "step-000005" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LORA", 8, ["q_proj", "v_proj"])
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert set(ckpt.tensors["modules"]) == set(result.model.trainable_state_dict())
    assert "adapters.image.proj.weight" in ckpt.tensors["modules"]
    assert ckpt.optimizer["state"] and ckpt.scheduler["last_step"] == 5
    assert ckpt.sampler == {"consumed": 5} and len(ckpt.rng_states) == 1


def test_resume_is_bit_identical_and_sigterm_saves(cache, tmp_path):
    common = ["schedule.max_steps=4", "checkpoint.every_steps=100", "model.init_from=null",
              "lora.lora_dropout=0.1", "optim.lr=1e-2"]  # dropout: the restored RNG state matters
    straight = train(tiny(cache, tmp_path / "a", *common))

    def stop_at_two(step, outputs):
        """Send this process a real SIGTERM after step 2."""
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(tiny(cache, tmp_path / "b", *common), on_step=stop_at_two)
    assert first.stopped_early and first.step == 2 and first.checkpoint.name == "step-000002"
    resumed = train(tiny(cache, tmp_path / "b", *common, "resume=auto"))
    assert resumed.step == 4
    assert [r["loss"] for r in logged(tmp_path / "b")] == [r["loss"] for r in logged(tmp_path / "a")]
    a, b = trained_tensors(straight.checkpoint), trained_tensors(resumed.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nan_loss_stops_naming_step_and_batch(cache, tmp_path, monkeypatch):
    import mrgfast.train.loop as loop
    original = loop.save

    def save_then_poison(state):
        """Save, then make every later loss NaN through a LoRA weight (after the step-2 checkpoint: the step-3 loss
        is NaN)."""
        path = original(state)
        with torch.no_grad():
            next(p for n, p in state.core.named_parameters() if "lora_A" in n).fill_(float("nan"))
        return path

    monkeypatch.setattr(loop, "save", save_then_poison)
    config = tiny(cache, tmp_path, "schedule.max_steps=6", "checkpoint.every_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"at step 3, batch sample ids \[synth") as info:
        train(config)
    assert info.value.step == 3 and info.value.batch_ids
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002"]
    read_checkpoint(tmp_path / "step-000002")  # verifies every file's sha256
    assert all(torch.isfinite(t).all() for t in trained_tensors(tmp_path / "step-000002").values())


@pytest.fixture
def nan_at_steps_2_and_3(monkeypatch):
    """Make the loss (and so every gradient) of a run's 2nd and 3rd steps NaN; returns the loss calls so far and
    the models built."""
    import mrgfast.train.setup as setup
    import mrgfast.training.steps as steps
    real_loss, real_build, calls, models = steps.sft_loss, setup.build_all, [], []

    def sometimes_nan(model, micro):
        calls.append(1)
        loss = real_loss(model, micro)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    def keep_model(*args, **kwargs):
        pieces = real_build(*args, **kwargs)
        models.append(pieces.model)
        return pieces

    monkeypatch.setattr(steps, "sft_loss", sometimes_nan)
    monkeypatch.setattr(setup, "build_all", keep_model)
    return dict(calls=calls, models=models)


def test_skip_mode_leaves_the_weights_of_nonfinite_steps_untouched(cache, tmp_path, nan_at_steps_2_and_3):
    weights = {}

    def keep(step, outputs):
        """The trainable weights after each step."""
        model = nan_at_steps_2_and_3["models"][0]
        weights[step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    result = train(tiny(cache, tmp_path, "schedule.max_steps=5", "guard.on_nonfinite=skip",
                        "checkpoint.every_steps=100"), on_step=keep)
    assert result.step == 5 and [r["skipped_steps"] for r in result.history] == [0, 1, 2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[3]))       # steps 2 and 3 were skipped
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))   # step 4 trained
    assert all(torch.isfinite(t).all() for t in trained_tensors(result.checkpoint).values())


def test_stop_mode_and_the_skip_limit_stop_the_run(cache, tmp_path, nan_at_steps_2_and_3):
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 2"):
        train(tiny(cache, tmp_path / "stop", "schedule.max_steps=5"))
    nan_at_steps_2_and_3["calls"].clear()  # the next run's 2nd and 3rd steps
    with pytest.raises(NonFiniteError, match="2 steps in a row .* guard.max_consecutive_skips=1"):
        train(tiny(cache, tmp_path / "limit", "schedule.max_steps=5", "guard.on_nonfinite=skip",
                   "guard.max_consecutive_skips=1"))


def test_vision_cache_reuses_frozen_features_with_the_same_losses(cache, tmp_path):
    plain = train(tiny(cache, tmp_path / "plain", "schedule.max_steps=8", "checkpoint.every_steps=100"))
    cached = train(tiny(cache, tmp_path / "cached", "schedule.max_steps=8", "checkpoint.every_steps=100",
                        "model.vision_cache=disk"))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in cached.history]),
                               torch.tensor([r["loss"] for r in plain.history]), rtol=1e-5, atol=1e-6)
    last = cached.history[-1]
    assert last["vision_cache_hits"] > 0 and last["vision_cache_misses"] > 0  # 8 steps run past one epoch
    assert "vision_cache_hits" not in plain.history[-1]
    assert len(list((tmp_path / "cached" / "feature_cache").glob("*/*.safetensors"))) == last["vision_cache_misses"]


def test_step_with_vision_cache_is_host_sync_free(cache, tmp_path):
    pieces = build_all(tiny(cache, tmp_path, "model.vision_cache=memory"), torch.device("cpu"))
    params = [p for p in pieces.model.parameters() if p.requires_grad]
    (batch,), _ = host_batches(pieces, 1)
    micro = MicroBatch(prepare(batch, "cpu", digest_images=True), torch.tensor(float(supervised_tokens(batch))),
                       torch.ones(()))
    assert len(micro.batch.image_digests) == len(micro.batch.sample_ids)
    for _ in range(2):  # a miss, then a hit
        with no_host_sync():
            train_step(pieces.model, pieces.optimizer, [micro], StepSettings(), params)
    assert pieces.model.feature_cache.hits > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda_logs_graph_use(tmp_path):
    result = train(tiny_cuda(tmp_path, "schedule.max_steps=6", "telemetry.log_every=1", "cuda_graphs=true"))
    last = result.history[-1]
    assert result.step == 6 and torch.isfinite(torch.tensor(last["loss"]))
    # Warm-up steps run eagerly, then every step replays the graph: static batches share one signature.
    assert last["graph_eager_steps"] == 3 and last["graph_replays"] == 3
