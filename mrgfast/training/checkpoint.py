"""Atomic training checkpoints (`<output_dir>/step-XXXXXX/`): weights, optimizer, scheduler, RNG, sampler state; the
checkpoint a run resumes from (the newest that verifies) and the leftovers of interrupted saves and prunes."""

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from mrgfast.common.exit_codes import IO
from mrgfast.common.files import atomic_write, orphaned_temp, remove_directory
from mrgfast.common.rng import capture_rng_state, restore_rank_rng_state
from mrgfast.peft.adapter_io import save_adapter
from mrgfast.training.state_io import load_tensors, read_state, save_tensors, write_state

STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.step-\d+\.(tmp|old)-")   # a save being written or a checkpoint being removed
MANIFEST = "manifest.json"
ADAPTER_SUFFIX = "adapter"      # checkpoint sub-directory holding the PEFT-format adapter
MODULES_GROUP = "modules"       # checkpoint tensor group: trainable weights other than LoRA (projector, prompts, ...)
STATE_NAME = "trainer_state"
FORMAT_VERSION = 1

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run: the message names the file."""

    exit_code = IO


# A writer puts extra files into the directory it is given (e.g. the PEFT adapter via save_adapter).
Writer = Callable[[Path], Any]


@dataclass
class Checkpoint:
    """What a checkpoint holds, read back from disk."""

    path: Path
    step: int
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    optimizer: Optional[dict] = None
    scheduler: Optional[dict] = None
    rng_states: list = field(default_factory=list)
    sampler: Any = None
    extra: Any = None


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at `step`."""
    return f"step-{step:06d}"


def save_checkpoint(output_dir: PathLike, step: int, *, tensors: Optional[dict[str, dict[str, Tensor]]] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, sampler: Any = None,
                    extra: Any = None, rng_states: Optional[list] = None, writers: Optional[dict[str, Writer]] = None,
                    keep_last: int = 2, optimizer_state: Optional[dict] = None,
                    files: Optional[dict[str, str]] = None) -> Path:
    """Write the checkpoint of `step` atomically and keep the newest `keep_last`; returns its directory.

    `tensors` maps a group name to named tensors, each group one `<name>.safetensors` (e.g. the projector);
    `writers` maps a sub-directory name to a function that fills it (e.g. `adapter_writer(model)`);
    `optimizer_state` is an optimizer's state_dict() taken already (e.g. gathered from FSDP2 shards by
    mrgfast.training.fsdp.gather_full_state), given instead of `optimizer`;
    `rng_states` is one capture_rng_state() per rank (default: this process's); `sampler`/`extra` are
    plain values (numbers, strings, lists, dicts, tensors); `files` maps a file name to text written beside them
    (e.g. the run's config.yaml). Everything goes to a temporary directory that is renamed into place only when
    complete, so an interrupted save never damages an older checkpoint. A failed write raises OSError naming the
    checkpoint.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1, got {keep_last}")
    if optimizer is not None and optimizer_state is not None:
        raise ValueError("save_checkpoint: give optimizer or optimizer_state, not both")
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    final = root / step_dir_name(step)
    try:
        # Filled under `.step-XXXXXX.tmp-<pid>-...`, which remove_stale_temps knows; readable like other outputs.
        with atomic_write(final, directory=True, mode=0o755, fsync=True) as temp:
            write_contents(temp, step, tensors or {}, optimizer_state, scheduler, sampler, extra,
                           rng_states if rng_states is not None else [capture_rng_state()], writers or {},
                           files or {})
    except OSError as err:  # a full disk's error names no file: name the checkpoint
        raise OSError(err.errno, f"cannot write the checkpoint ({err.strerror or err})", str(final)) from err
    prune(root, keep_last, keep=final)
    return final


def write_contents(directory: Path, step: int, tensors: dict, optimizer_state, scheduler, sampler, extra,
                   rng_states: list, writers: dict[str, Writer], files: dict[str, str]) -> None:
    """Fill a (temporary) checkpoint directory, manifest last."""
    for name, text in files.items():
        check_name("file", name)
        (directory / name).write_text(text, encoding="utf-8")
    for group, named in tensors.items():
        check_name("tensor group", group)
        save_tensors(named, directory / f"{group}.safetensors")
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "tensor_groups": sorted(tensors),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_states": rng_states,
        "sampler": sampler,
        "extra": extra,
    }
    write_state(directory, STATE_NAME, state)
    for name, write in writers.items():
        check_name("writer", name)
        (directory / name).mkdir()
        write(directory / name)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    manifest = {"format": FORMAT_VERSION, "step": step, "files": {f: sha256(directory / f) for f in files}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def check_name(kind: str, name: str) -> None:
    """ValueError unless `name` is a plain file-name part (no separators, not a reserved name)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or "") or name.startswith(".") \
            or name in (MANIFEST, STATE_NAME) or name.startswith(STATE_NAME + "."):
        raise ValueError(f"save_checkpoint: {kind} name {name!r} must be letters, digits, '_', '-', '.' "
                         f"(not starting with '.', not {STATE_NAME!r} or {MANIFEST!r})")


def remove_stale_temps(root: Path) -> list[str]:
    """Delete temp/old directories left by an interrupted save or prune (never a complete checkpoint) whose owner
    process is gone: a live owner may be writing one still. Returns their names."""
    removed = []
    for entry in root.iterdir():
        if entry.is_dir() and TEMP_DIR.match(entry.name) and orphaned_temp(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def remove_leftovers(root: PathLike) -> list[str]:
    """What interrupted saves and prunes left in an output_dir, removed (call it holding the output_dir's lock):
    orphaned temp directories, and `step-*` directories without a manifest (a checkpoint is renamed into place
    whole, so such a directory is half of an older prune's work). Returns their names."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = remove_stale_temps(root)
    for entry in sorted(root.iterdir()):
        if STEP_DIR.match(entry.name) and entry.is_dir() and not (entry / MANIFEST).is_file():
            remove_directory(entry)
            removed.append(entry.name)
    return removed


def prune(root: Path, keep_last: int, keep: Path) -> None:
    """Remove complete checkpoints older than the newest `keep_last` (never `keep`), each renamed away first so a
    kill halfway leaves a temp name (remove_stale_temps), never a partial `step-*` directory."""
    done = complete_checkpoints(root)
    for step, path in done[:-keep_last] if len(done) > keep_last else []:
        if path != keep:
            remove_directory(path)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoint directories holding a manifest, oldest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and entry.is_dir() and (entry / MANIFEST).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_checkpoints(output_dir: PathLike) -> None:
    """Delete every complete checkpoint in output_dir (a caller that starts a run there afresh on purpose)."""
    for _, path in complete_checkpoints(Path(output_dir)):
        remove_directory(path)


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint directory in `output_dir`, or None."""
    done = complete_checkpoints(Path(output_dir))
    return done[-1][1] if done else None


def resolve_resume(resume: str, output_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: 'auto' -> latest in output_dir (or None), 'none' -> None, else that path."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume == "none":
        return None
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"resume={resume}: not a complete checkpoint directory (no {MANIFEST}); "
                              "expected 'auto', 'none' or a step-XXXXXX directory written by save_checkpoint")
    return path


def find_resume(resume: str, output_dir: PathLike, log=None) -> Optional[Checkpoint]:
    """The checkpoint a run continues, read and verified: resume=auto takes the newest in output_dir that verifies,
    reporting each newer one it skips and why through `log` (default: stderr); an explicit path must verify
    (CheckpointError naming the file otherwise); 'none' and an output_dir without checkpoints give None."""
    if resume != "auto":
        path = resolve_resume(resume, output_dir)
        return read_checkpoint(path) if path is not None else None
    log = log or (lambda line: print(line, file=sys.stderr))
    for _, path in reversed(complete_checkpoints(Path(output_dir))):
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            log(f"resume=auto: skipping {path.name}, it does not verify: {err}")
    return None


def newer_checkpoints(output_dir: PathLike, step: int, besides: Optional[Path] = None) -> list[Path]:
    """The complete checkpoints in output_dir after `step` (other than `besides`), oldest first."""
    return [path for s, path in complete_checkpoints(Path(output_dir))
            if s > step and (besides is None or path.resolve() != Path(besides).resolve())]


def read_checkpoint(path: PathLike, verify: bool = True) -> Checkpoint:
    """Read a checkpoint without applying it; `verify` checks every file against the manifest's sha256. Whatever is
    missing, corrupt or unreadable raises CheckpointError naming the file."""
    directory = Path(path)
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file}: missing; {directory} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_file}: not a valid checkpoint manifest ({err})") from err
    try:
        if verify:
            verify_files(directory, files)
        state = read_state(directory, STATE_NAME)
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{directory / (STATE_NAME + '.json')}: format {state.get('format')!r}, "
                                  f"expected {FORMAT_VERSION}")
        tensors = {g: load_tensors(directory / f"{g}.safetensors") for g in state["tensor_groups"]}
    except CheckpointError:
        raise
    except (ValueError, OSError) as err:  # the readers name the file
        raise CheckpointError(str(err)) from err
    return Checkpoint(path=directory, step=state["step"], tensors=tensors, optimizer=state["optimizer"],
                      scheduler=state["scheduler"], rng_states=state["rng_states"], sampler=state["sampler"],
                      extra=state["extra"])


def verify_files(directory: Path, files: dict[str, str]) -> None:
    """CheckpointError naming the first file that is missing or whose sha256 differs from the manifest."""
    for name, digest in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing; the checkpoint is incomplete")
        if sha256(file) != digest:
            raise CheckpointError(f"{file}: corrupt (its sha256 differs from {directory / MANIFEST})")


def load_checkpoint(path: PathLike, *, optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                    restore_rng: bool = True, rank: int = 0, verify: bool = True) -> Checkpoint:
    """Read a checkpoint and restore the optimizer, scheduler and this rank's RNG state; returns the contents.

    Model tensors are returned (`.tensors`) for the caller to copy in (`copy_tensors_into`), and writer
    sub-directories (e.g. the adapter) are read by their own loaders from `.path / name`.
    """
    ckpt = read_checkpoint(path, verify=verify)
    if optimizer is not None:
        if ckpt.optimizer is None:
            raise CheckpointError(f"{ckpt.path}: holds no optimizer state, but an optimizer was given to restore")
        load_optimizer_state(optimizer, ckpt.optimizer, ckpt.path)
    if scheduler is not None:
        if ckpt.scheduler is None:
            raise CheckpointError(f"{ckpt.path}: holds no scheduler state, but a scheduler was given to restore")
        scheduler.load_state_dict(ckpt.scheduler)
    if restore_rng:
        restore_rank_rng_state(ckpt.rng_states, rank, ckpt.path)
    return ckpt


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: Path,
                         load: Optional[Callable[[dict], Any]] = None) -> None:
    """optimizer.load_state_dict (or `load`, e.g. one scattering a full state into FSDP2 shards), keeping each
    group's tensor `lr` the same tensor object (CUDA graphs captured with it keep reading the right memory) with
    the saved value copied in."""
    held = [group.get("lr") for group in optimizer.param_groups]
    try:
        (load or optimizer.load_state_dict)(state)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{source}: optimizer state does not fit this optimizer ({err})") from err
    for group, old in zip(optimizer.param_groups, held):
        if isinstance(old, Tensor):
            with torch.no_grad():
                old.copy_(torch.as_tensor(group["lr"]))
            group["lr"] = old


def copy_tensors_into(module: nn.Module, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Copy named tensors into `module`'s parameters/buffers of the same names; keys and shapes must match."""
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    unknown = sorted(set(tensors) - set(targets))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensor(s) not in the model, e.g. {unknown[0]!r}")
    for name, value in tensors.items():
        if value.shape != targets[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(targets[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


def adapter_writer(model: nn.Module, tensors: Optional[dict[str, Tensor]] = None) -> Writer:
    """A writer that saves `model`'s LoRA adapter in PEFT format (mrgfast.peft.save_adapter); `tensors` are
    written instead of the model's own (e.g. full copies of FSDP2-sharded parameters)."""
    return lambda directory: save_adapter(model, directory, tensors=tensors)


def sha256(file: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
