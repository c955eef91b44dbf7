"""What a resumed run may change against the config its checkpoint recorded: refused keys named in one line, allowed
ones listed, free ones (where and how it runs) never compared, accumulation judged by the global batch."""

import pytest
import yaml

from mrgfast.config import ConfigError, check_resume_changes, config_text, load_config
from mrgfast.config.resume_changes import changed_keys


def recorded(tmp_path, *overrides):
    """A checkpoint directory holding the config.yaml of a run with these overrides."""
    (tmp_path / "config.yaml").write_text(config_text(load_config(None, list(overrides))))
    return tmp_path


def test_unchanged_and_free_keys_pass(tmp_path):
    ckpt = recorded(tmp_path, "optim.lr=0.001")
    same = load_config(None, ["optim.lr=0.001", "output_dir=elsewhere", "resume=auto", "telemetry.log_every=3",
                              "checkpoint.keep_last=9", "eval.every_steps=5", "guard.on_nonfinite=skip",
                              "data.num_workers=2", "model.vision_cache=memory", "device=cpu"])
    assert check_resume_changes(same, ckpt) == []


def test_changes_to_what_is_trained_are_refused_in_one_line_naming_every_key(tmp_path):
    ckpt = recorded(tmp_path, "optim.lr=0.001")
    changed = load_config(None, ["optim.lr=0.5", "lora.r=4", "schedule.max_steps=400", "seed=1"])
    with pytest.raises(ConfigError) as info:
        check_resume_changes(changed, ckpt)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"resume from {ckpt}: ")
    for part in ("seed (0 -> 1)", "lora.r (8 -> 4)", "optim.lr (0.001 -> 0.5)", "schedule.max_steps (200 -> 400)",
                 "resume_allow_changes=[seed,lora.r,optim.lr,schedule.max_steps]"):
        assert part in message, message


def test_allowed_changes_by_key_or_section_are_returned(tmp_path):
    ckpt = recorded(tmp_path)
    allowed = load_config(None, ["optim.lr=0.5", "optim.eps=1e-6", "schedule.max_steps=400",
                                 "resume_allow_changes=[optim,schedule.max_steps]"])
    assert check_resume_changes(allowed, ckpt) == ["optim.lr (0.0001 -> 0.5)", "optim.eps (1e-08 -> 1e-06)",
                                                   "schedule.max_steps (200 -> 400)"]
    with pytest.raises(ConfigError, match="no config key or section; did you mean 'schedule.max_steps'"):
        load_config(None, ["resume_allow_changes=[schedule.max_step]"])


def test_accumulation_counts_with_the_number_of_processes(tmp_path):
    ckpt = recorded(tmp_path, "optim.grad_accum_steps=2")
    four = load_config(None, ["optim.grad_accum_steps=4"])
    assert check_resume_changes(four, ckpt, world_sizes=(2, 1)) == []
    with pytest.raises(ConfigError, match=r"optim.grad_accum_steps \('2 x 2 process\(es\)' -> '4 x 2 process"):
        check_resume_changes(four, ckpt, world_sizes=(2, 2))


def test_keys_one_side_lacks_and_checkpoints_without_a_config(tmp_path):
    old = yaml.safe_load(config_text(load_config(None, [])))
    del old["guard"], old["optim"]["lr"]   # written by an older mrgfast
    assert changed_keys(old, yaml.safe_load(config_text(load_config(None, ["optim.lr=0.5"])))) == []
    assert check_resume_changes(load_config(None, []), tmp_path) == ["<no recorded config>"]
