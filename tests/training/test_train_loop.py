"""The training loop on the tiny synthetic twin: learning, accumulation == one big batch, clipping, checkpoints,
exact resume, SIGTERM, NaN stop, a sync-free step, 2-process gloo == 1 process, telemetry, the CLI."""

import copy
import json
import os
import signal
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mrgfast.data.packing import PackingCollator
from mrgfast.data.static_batch import StaticShape, make_static
from mrgfast.testing.sync_guard import no_host_sync
from mrgfast.train import train
from mrgfast.train.__main__ import main
from mrgfast.assemble import build_all
from mrgfast.training.checkpoint import read_checkpoint
from mrgfast.config import config_to_dict, load_config
from mrgfast.training.cuda_graph import signature
from mrgfast.training.guards import NonFiniteLossError
from mrgfast.training.steps import MicroBatch, StepSettings, prepare, sft_loss, supervised_tokens, train_step

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def tiny_overrides(cache: Path) -> list:
    """Overrides that shrink the demo config to a model and dataset that train in well under a second a step."""
    return ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16", "model.vision_depth=1",
            f"data.cache_dir={cache}", "data.synthetic_n=12", "data.synthetic_size=32", "data.synthetic_volumes=0",
            "data.token_budget=256", "data.rows=1", "data.max_length=256", "schedule.warmup_steps=0",
            "telemetry.progress_bar=false", "telemetry.tensorboard=false", "telemetry.log_every=1", "resume=none"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic twin (and its demo tokenizer) for the whole module."""
    return tmp_path_factory.mktemp("synthetic-cache")


def tiny(cache, out, *extra):
    """The tiny demo config writing to `out`, with more overrides."""
    return load_config(DEMO, tiny_overrides(cache) + [f"output_dir={out}", *extra])


def logged(out: Path) -> list:
    """The metrics.jsonl records of a run."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained_tensors(checkpoint: Path) -> dict:
    """Adapter and other trainable weights of a checkpoint directory."""
    tensors = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    tensors.update(load_file(str(checkpoint / "modules.safetensors")))
    return tensors


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


def host_batches(pieces, count):
    """The first `count` micro-batches of the unshuffled sample order, collated on the host."""
    groups = pieces.packed.batches()[:count]
    return [pieces.collator([pieces.dataset[i] for i in group]) for group in groups], groups


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
    with pytest.raises(ValueError, match="support SFT batches only"):
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
    import mrgfast.train.setup as loop
    models = []
    original = loop.build_all

    def keep_model(*args, **kwargs):
        """build_all, keeping the model for `poison`."""
        pieces = original(*args, **kwargs)
        models.append(pieces.model)
        return pieces

    def poison(step, outputs):
        """Make every later loss NaN through a LoRA weight."""
        if step == 2:  # after the step-2 checkpoint: the step-3 loss is NaN
            with torch.no_grad():
                next(p for n, p in models[0].named_parameters() if "lora_A" in n).fill_(float("nan"))

    monkeypatch.setattr(loop, "build_all", keep_model)
    config = tiny(cache, tmp_path, "schedule.max_steps=6", "checkpoint.every_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"at step 3, batch sample ids \[synth") as info:
        train(config, on_step=poison)
    assert info.value.step == 3 and info.value.batch_ids
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002"]
    good = read_checkpoint(tmp_path / "step-000002")  # verifies every file's sha256
    assert all(torch.isfinite(t).all() for t in good.tensors["modules"].values())


def free_port() -> int:
    """An unused local TCP port for the gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int) -> None:
    """Set up a spawned process as torchrun would for rank `rank` of `world` on this host (MASTER_PORT: the caller's),
    with one torch thread so the two ranks do not fight over the cores."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)


def gloo_worker(rank, world, ports, configs, queue):
    """One rank of the 2-process runs (torch.multiprocessing target): trains each config in turn, each in a
    fresh process group on its own port (re-using one port right after teardown can race)."""
    become_rank(rank, world)
    from mrgfast.config import TrainConfig
    from mrgfast.config.parse import build
    from torch.distributed.tensor import DTensor
    runs = []
    for port, config in zip(ports, configs):
        os.environ["MASTER_PORT"] = str(port)
        result = train(build(TrainConfig, config))
        params = list(result.model.parameters())
        sharded = [isinstance(p, DTensor) for p in params]
        runs.append(([r["loss"] for r in result.history], sum(sharded),
                     any(s for s, p in zip(sharded, params) if p.requires_grad)))
    queue.put((rank, runs))


def run_two_ranks(target, *args) -> dict:
    """{rank: what it put on the queue} of `target(rank, 2, *args, queue)` run in 2 spawned processes."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():  # never leave a stuck worker behind
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return dict(queue.get(timeout=5) for _ in procs)


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


def cli_worker(rank, world, port, argv, queue):
    """One rank of a 2-process `python -m mrgfast.train` run: main()'s exit code and the process group threads
    still running once it has returned."""
    become_rank(rank, world)
    os.environ["MASTER_PORT"] = str(port)
    from tests.training.dist_worker import communication_threads
    code = main(argv)
    queue.put((rank, (code, communication_threads())))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_two_process_fsdp_cli_stops_the_groups_threads_before_it_returns(cache, tmp_path):
    """The FSDP2 model keeps the group alive in reference cycles; main() collects them, so no gloo or TCP-store
    thread is left running into interpreter shutdown (where such threads aborted a rank now and then)."""
    argv = [f"config={DEMO}", *tiny_overrides(cache), *TWO_PROCESS, f"output_dir={tmp_path}",
            "distributed.strategy=fsdp"]
    runs = run_two_ranks(cli_worker, free_port(), argv)
    assert runs == {0: (0, []), 1: (0, [])}
    assert (tmp_path / "step-000002").is_dir()


def test_cli_without_arguments_runs_the_demo(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    import mrgfast.train.__main__ as entry
    monkeypatch.setattr(entry, "demo", fake)
    assert main([]) == 0 and calls == [[]]


def test_cli_reports_bad_keys(capsys):
    assert main(["optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err


def test_step_runner_is_eager_on_cpu_and_signatures_ignore_bookkeeping(cache, tmp_path):
    from mrgfast.training.cuda_graph import StepRunner, signature
    config = tiny(cache, tmp_path, "data.shuffle=false")
    pieces = build_all(config, torch.device("cpu"))
    (first, second), _ = host_batches(pieces, 2)
    calls = []
    runner = StepRunner(lambda inputs: calls.append(inputs) or {"loss": torch.zeros(())}, "cpu", enabled=True)
    assert not runner.enabled and runner({"x": first})["loss"] == 0 and calls == [{"x": first}]
    assert runner.stats() == {}
    relabelled = copy.deepcopy(first)
    relabelled.sample_ids = ["other"] * len(first.sample_ids)
    relabelled.input_ids = relabelled.input_ids.flip(-1)  # values change, shapes and host structure do not
    assert signature(relabelled) == signature(first)
    assert signature(second) != signature(first)  # other documents: a graph captured on `first` cannot replay it


def test_build_rejects_bad_settings_naming_them(cache, tmp_path):
    from mrgfast.config import ConfigError
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"data.max_length: sample 'synth\d+' .* has \d+ tokens, more than "
                                          r"max_length=20"):
        build_all(tiny(cache, tmp_path, "data.max_length=20"), cpu)
    with pytest.raises(ConfigError, match="dpo.reference: 'disabled_adapters' needs lora.enabled=true"):
        build_all(tiny(cache, tmp_path, "mode=dpo", "lora.enabled=false"), cpu)
    with pytest.raises(ConfigError, match="data.path: .* holds no manifest.json"):
        build_all(tiny(cache, tmp_path, f"data.path={tmp_path}"), cpu)


def test_sigterm_to_the_cli_process_saves_and_exits_cleanly(cache, tmp_path):
    import subprocess
    import time
    args = [sys.executable, "-m", "mrgfast.train", f"config={DEMO}", *tiny_overrides(cache),
            f"output_dir={tmp_path}", "schedule.max_steps=100000", "checkpoint.every_steps=100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received at step" in err
    saved = sorted(tmp_path.glob("step-*"))
    assert len(saved) == 1 and read_checkpoint(saved[0]).step == int(saved[0].name.split("-")[1]) >= 2


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
