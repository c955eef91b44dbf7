"""What a resumed run may change: its config is compared with the one its checkpoint was trained with, and a change to
what it trains (model, adapters, data, optimizer, schedule, mode, seed) is refused unless `resume_allow_changes` lists
it. Where and how the run goes on (output, devices, logging, checkpoints, evaluation, guards) may change freely."""

from pathlib import Path
from typing import Any, Optional

from mrgfast.common.names import few
from mrgfast.config.parse import ConfigError, read_yaml
from mrgfast.config.train_config import RESOLVED_NAME, TrainConfig, config_to_dict

# Keys (or sections) that say where and how a run goes on, not what it trains: never compared.
FREE = ("resume", "resume_allow_changes", "output_dir", "device", "cuda_graphs", "telemetry", "checkpoint", "eval",
        "guard", "distributed", "data.num_workers", "data.cache_dir", "model.vision_cache", "model.vision_cache_dir",
        "model.vision_cache_max_gb", "model.activation_checkpointing", "model.fused_elementwise")


def covers(prefixes, key: str) -> bool:
    """Whether the dotted `key` is one of `prefixes` or lies inside one of those sections."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted key: value}."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ACCUMULATION = "optim.grad_accum_steps"


def changed_keys(old: dict, new: dict, world_sizes: tuple = (1, 1)) -> list:
    """(key, old value, new value) for every compared key whose value differs. Keys only one side has (a config
    written by an older or newer mrgfast) are not compared. Gradient accumulation counts as the global batch it
    makes with the number of processes (`world_sizes`: the checkpoint's, this run's), so a run may resume on fewer
    processes accumulating more."""
    before, after = flatten(old), flatten(new)
    if ACCUMULATION in before and ACCUMULATION in after:
        before[ACCUMULATION] = f"{before[ACCUMULATION]} x {world_sizes[0]} process(es)"
        after[ACCUMULATION] = f"{after[ACCUMULATION]} x {world_sizes[1]} process(es)"
        if old["optim"]["grad_accum_steps"] * world_sizes[0] == new["optim"]["grad_accum_steps"] * world_sizes[1]:
            before[ACCUMULATION] = after[ACCUMULATION]
    return [(key, before[key], after[key]) for key in after
            if key in before and not covers(FREE, key) and before[key] != after[key]]


def checkpoint_config(checkpoint: Path) -> Optional[dict]:
    """The config a checkpoint recorded (its own config.yaml) as a mapping, or None for a checkpoint written before
    checkpoints recorded it."""
    file = Path(checkpoint) / RESOLVED_NAME
    return read_yaml(file) if file.is_file() else None


def show(key: str, old: Any, new: Any) -> str:
    """'key (old -> new)' for messages."""
    return f"{key} ({old!r} -> {new!r})"


def check_resume_changes(config: TrainConfig, checkpoint: Path, world_sizes: tuple = (1, 1)) -> list:
    """The allowed changes ('key (old -> new)') of `config` against the config `checkpoint` was trained with (on
    world_sizes[0] processes; this run on world_sizes[1]); a change resume_allow_changes does not list raises one
    ConfigError naming every such key. A checkpoint without a recorded config gives ['<no recorded config>']
    (nothing could be compared)."""
    old = checkpoint_config(checkpoint)
    if old is None:
        return ["<no recorded config>"]
    changes = changed_keys(old, config_to_dict(config), world_sizes)
    refused = [c for c in changes if not covers(config.resume_allow_changes, c[0])]
    if refused:
        keys = [key for key, _, _ in refused]
        raise ConfigError(f"resume from {checkpoint}: the config changes {few([show(*c) for c in refused])} against "
                          f"the config it was trained with; add resume_allow_changes=[{','.join(keys)}] to change "
                          "them anyway, or train afresh in another output_dir")
    return [show(*c) for c in changes]
