"""Metrics sinks: a JSONL file (one line per logged step, flushed) and TensorBoard when it is installed."""

import json
import math
import time
from numbers import Real
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor

from mrgfast.common.files import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def plain_value(key: str, value: Any) -> Any:
    """A metric as a JSON value: numbers (0-d tensors read here), strings, mappings of them (e.g. the data
    reader's counts); non-finite floats as 'nan'/'inf'."""
    if isinstance(value, dict):
        return {str(k): plain_value(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a number or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return value
    if isinstance(value, Real):
        value = float(value) if not isinstance(value, int) else value
        # Strict JSON has no NaN/Infinity; a string keeps the line parseable and the event visible.
        return value if not isinstance(value, float) or math.isfinite(value) else repr(value)
    raise ValueError(f"metric {key!r}: expected a number or string, got {type(value).__name__}")


class JsonlLogger:
    """Appends `{"step": s, "time": t, ...metrics}` lines to a file, flushed after each line."""

    def __init__(self, path: Union[str, Path], resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Write one line for `step`; returns the record written."""
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: plain_value(k, v) for k, v in metrics.items()})
        try:
            self.handle.write(json.dumps(record, allow_nan=False) + "\n")
            self.handle.flush()
        except OSError as err:  # a full disk's error names no file
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        return record

    def close(self) -> None:
        """Close the file."""
        if not self.handle.closed:
            try:
                self.handle.close()
            except OSError:
                pass  # log() flushes every line: only a line whose failure log() raised already is left unwritten


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run redoes those steps), rewriting the file atomically."""
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A line cut short by a crash: it is the last one and is dropped.
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: not a metrics record with an integer 'step'")
        if record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept), mode=0o644)


def open_tensorboard(log_dir: Union[str, Path]):
    """A torch SummaryWriter for `log_dir`, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def write_scalars(writer, step: int, record: dict, prefix: str = "") -> None:
    """Write a record's numeric values to a SummaryWriter as `prefix + key` (strings and the wall time skipped)."""
    for key, value in record.items():
        if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(prefix + key, value, step)
