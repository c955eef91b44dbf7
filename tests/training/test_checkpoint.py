"""Checkpoints: exact save/restore of weights, optimizer, schedule, RNG and sampler; atomicity; retention; errors;
the checkpoint a run resumes from; leftovers of interrupted saves and prunes."""

import copy
import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mrgfast.common.rng import seed_everything
from mrgfast.peft import LoraConfig, apply_lora, load_adapter
from mrgfast.common.exit_codes import IO
from mrgfast.training.checkpoint import (MANIFEST, CheckpointError, adapter_writer, copy_tensors_into, find_resume,
                                         latest_checkpoint, load_checkpoint, newer_checkpoints, read_checkpoint,
                                         remove_leftovers, resolve_resume, save_checkpoint)
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule
from mrgfast.training.state_io import same_state


class Tiny(nn.Module):
    """A small model with dropout, so the training result depends on the torch RNG stream."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(5, 7), nn.Linear(7, 3), nn.Dropout(0.3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def setup(fused="auto"):
    """A seeded model, fused AdamW with a tensor LR, and a warmup+cosine schedule."""
    seed_everything(0)
    model = Tiny()
    opt = build_adamw(model.parameters(), 1e-2, torch.device("cpu"), weight_decay=0.01, fused=fused)
    sched = WarmupSchedule(opt, total_steps=20, warmup_steps=3)
    return model, opt, sched


def train(model, opt, sched, steps):
    """`steps` optimizer steps on random batches drawn from the global RNGs (python, numpy, torch)."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 5) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def rng_draws():
    """One draw from each global generator."""
    return random.random(), np.random.rand(3).tolist(), torch.rand(3)


@pytest.mark.parametrize("fused", ["auto", False])
def test_resume_continues_bit_identically(tmp_path, fused):
    model, opt, sched = setup(fused)
    straight = train(model, opt, sched, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = setup(fused)
    first = train(model, opt, sched, 3)
    path = save_checkpoint(tmp_path, 3, tensors={"model": model.state_dict()}, optimizer=opt, scheduler=sched,
                           sampler={"epoch": 0, "position": 12})
    train(model, opt, sched, 2)  # runs on past the checkpoint, as a crashed run would have

    model, opt, sched = setup(fused)
    lr_tensor = opt.param_groups[0]["lr"]
    ckpt = load_checkpoint(latest_checkpoint(tmp_path), optimizer=opt, scheduler=sched)
    copy_tensors_into(model, ckpt.tensors["model"])
    assert ckpt.path == path and ckpt.step == 3 and ckpt.sampler == {"epoch": 0, "position": 12}
    if fused == "auto":  # a graph captured with the LR tensor must keep reading the restored LR
        assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == sched.get_last_lr()[0]
    second = train(model, opt, sched, 3)
    assert torch.equal(torch.cat([first, second]), straight)
    assert same_state(model.state_dict(), expected)


def test_restore_is_exact_for_every_part(tmp_path):
    model, opt, sched = setup()
    train(model, opt, sched, 2)
    extra = {"tuple": (1, 2.5, "x"), 3: "int key", "nan": float("nan"), "inf": float("-inf"), "t": torch.arange(3),
             "np": np.int64(4), "bf16": torch.tensor([1.5, -0.0], dtype=torch.bfloat16), "none": None}
    save_checkpoint(tmp_path, 2, tensors={"proj": {"w": model.fc1.weight}}, optimizer=opt, scheduler=sched,
                    extra=extra)
    saved_opt = copy.deepcopy(opt.state_dict())
    after_save = rng_draws()
    train(model, opt, sched, 3)  # perturb everything

    ckpt = load_checkpoint(tmp_path / "step-000002", optimizer=opt, scheduler=sched)
    assert sched.last_step == 2
    assert same_state(opt.state_dict(), saved_opt)
    assert same_state(ckpt.extra, {**extra, "np": 4})
    again = rng_draws()
    assert again[0] == after_save[0] and again[1] == after_save[1] and torch.equal(again[2], after_save[2])
    assert torch.equal(ckpt.tensors["proj"]["w"], read_checkpoint(ckpt.path).tensors["proj"]["w"])


def test_keeps_last_k_and_resolves_resume(tmp_path):
    model, opt, sched = setup()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, optimizer=opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"
    assert resolve_resume("auto", tmp_path) == tmp_path / "step-000004"
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(str(tmp_path / "step-000003"), tmp_path) == tmp_path / "step-000003"
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ValueError, match="not a complete checkpoint directory"):
        resolve_resume(str(tmp_path / "step-000001"), tmp_path)


def test_failed_save_leaves_last_good_checkpoint(tmp_path):
    model, opt, sched = setup()
    good = save_checkpoint(tmp_path, 1, tensors={"model": model.state_dict()}, keep_last=1)

    def broken_writer(directory):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, tensors={"model": model.state_dict()}, writers={"adapter": broken_writer},
                        keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert latest_checkpoint(tmp_path) == good
    read_checkpoint(good)


def test_saving_a_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, extra={"v": 1})
    save_checkpoint(tmp_path, 5, extra={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000005"]
    assert read_checkpoint(tmp_path / "step-000005").extra == {"v": 2}


def test_stale_temp_dirs_are_ignored_and_cleaned(tmp_path):
    stale = tmp_path / ".step-000009.tmp-abc"
    stale.mkdir(parents=True)
    (tmp_path / "step-000008").mkdir()  # no manifest: an incomplete directory is never "latest"
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1)
    assert not stale.exists() and latest_checkpoint(tmp_path) == tmp_path / "step-000001"


@pytest.mark.parametrize("victim", ["trainer_state.safetensors", "trainer_state.json", "model.safetensors"])
def test_corrupt_or_missing_file_is_named(tmp_path, victim):
    model, opt, sched = setup()
    train(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, 1, tensors={"model": model.state_dict()}, optimizer=opt)
    data = bytearray((path / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{victim}: corrupt"):
        load_checkpoint(path, optimizer=opt)
    (path / victim).unlink()
    with pytest.raises(ValueError, match=rf"{victim}: missing"):
        load_checkpoint(path, optimizer=opt)
    # Without the checksum pass the readers themselves still name the file.
    with pytest.raises(ValueError, match=rf"{victim}: missing"):
        read_checkpoint(path, verify=False)
    (path / MANIFEST).unlink()
    with pytest.raises(ValueError, match=rf"{MANIFEST}: missing"):
        read_checkpoint(path)


def test_unreadable_state_without_manifest_check_names_file(tmp_path):
    path = save_checkpoint(tmp_path, 1, extra={"a": torch.ones(2)})
    (path / "trainer_state.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="trainer_state.safetensors: not a readable safetensors file"):
        read_checkpoint(path, verify=False)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="trainer_state.json: not valid JSON"):
        read_checkpoint(path, verify=False)


def test_mismatches_are_clear_errors(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, tensors={"model": {"fc1.weight": torch.zeros(2, 2)}})
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(path, optimizer=opt)
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(2, 2\), the model expects \(7, 5\)"):
        copy_tensors_into(model, read_checkpoint(path).tensors["model"])
    with pytest.raises(ValueError, match="not in the model"):
        copy_tensors_into(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="RNG states for 1 rank"):
        load_checkpoint(path, rank=1)
    with pytest.raises(ValueError, match="cannot store a object"):
        save_checkpoint(tmp_path, 2, extra={"x": object()})
    with pytest.raises(ValueError, match="tensor group name"):
        save_checkpoint(tmp_path, 2, tensors={"../evil": {}})
    assert latest_checkpoint(tmp_path) == path


def test_adapter_writer_saves_a_loadable_peft_adapter(tmp_path, toy_model, toy_ids):
    apply_lora(toy_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in toy_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    path = save_checkpoint(tmp_path, 1, writers={"adapter": adapter_writer(toy_model)})
    assert {p.name for p in (path / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    assert "adapter/adapter_model.safetensors" in manifest
    read_checkpoint(path)  # the adapter files are checksummed too
    expected = toy_model(toy_ids)
    torch.manual_seed(0)
    from tests.conftest import ToyModel
    fresh = ToyModel().eval()
    fresh.load_state_dict({k: v for k, v in toy_model.state_dict().items() if "lora_" not in k}, strict=False)
    load_adapter(fresh, path / "adapter")
    torch.testing.assert_close(fresh(toy_ids), expected, rtol=0, atol=0)


def test_checkpoint_errors_carry_the_io_exit_code_and_files_are_written_and_checked(tmp_path):
    path = save_checkpoint(tmp_path, 1, files={"config.yaml": "seed: 3\n"})
    assert (path / "config.yaml").read_text() == "seed: 3\n"
    assert "config.yaml" in json.loads((path / MANIFEST).read_text())["files"]
    (path / "config.yaml").write_text("seed: 4\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml: corrupt") as info:
        read_checkpoint(path)
    assert info.value.exit_code == IO
    with pytest.raises(ValueError, match="file name"):
        save_checkpoint(tmp_path, 2, files={"manifest.json": "{}"})


def test_a_full_disk_names_the_checkpoint(tmp_path):
    def full(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="cannot write the checkpoint") as info:
        save_checkpoint(tmp_path, 3, writers={"adapter": full})
    assert info.value.filename == str(tmp_path / "step-000003") and info.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_find_resume_falls_back_past_checkpoints_that_do_not_verify(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, extra={"step": step}, keep_last=3)
    (tmp_path / "step-000003" / "trainer_state.json").write_text("{}")
    (tmp_path / "step-000002" / MANIFEST).write_text("{not json")
    lines = []
    found = find_resume("auto", tmp_path, log=lines.append)
    assert found.step == 1 and len(lines) == 2
    assert lines[0].startswith("resume=auto: skipping step-000003, it does not verify: ") and "corrupt" in lines[0]
    assert "step-000002" in lines[1] and "not a valid checkpoint manifest" in lines[1]
    with pytest.raises(CheckpointError, match=r"step-000003/trainer_state\.json: corrupt"):
        find_resume(str(tmp_path / "step-000003"), tmp_path)
    assert find_resume("none", tmp_path) is None and find_resume("auto", tmp_path / "empty") is None
    assert [p.name for p in newer_checkpoints(tmp_path, 1)] == ["step-000002", "step-000003"]
    assert newer_checkpoints(tmp_path, 2, besides=tmp_path / "step-000003") == []


def test_only_temps_whose_owner_is_gone_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".step-000002.tmp-{sleeper.pid}-abc123"   # another run still writing it
        dead = tmp_path / ".step-000003.tmp-999999999-abc123"
        legacy = tmp_path / ".step-000004.old-abc123"
        partial = tmp_path / "step-000005"                           # half a prune of an older version
        for directory in (live, dead, legacy, partial):
            directory.mkdir()
        save_checkpoint(tmp_path, 1)
        assert live.exists() and not dead.exists() and not legacy.exists() and partial.exists()
        assert remove_leftovers(tmp_path) == ["step-000005"] and not partial.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_leftovers(tmp_path) == [live.name]


def test_prune_renames_a_checkpoint_away_before_deleting_it(tmp_path, monkeypatch):
    import shutil
    save_checkpoint(tmp_path, 1, keep_last=1)
    real_rmtree, seen = shutil.rmtree, []

    def killed_halfway(path, ignore_errors=False):
        """The prune's delete dies after the rename: what stays behind is a temp name, never a partial step-*."""
        seen.append(os.path.basename(path))

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    save_checkpoint(tmp_path, 2, keep_last=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-000002"]
    assert seen and seen[-1].startswith(f".step-000001.old-{os.getpid()}-")
