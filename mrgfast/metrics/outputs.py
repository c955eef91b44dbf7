"""Evaluation outputs on disk: `eval.json` with every metric and a JSONL of per-sample generations, both atomic."""

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from mrgfast.common.files import atomic_write_text

RESERVED_FIELDS = ("id", "reference", "generation")


def _plain(value):
    """JSON fallback for numpy / torch scalars (anything with .item()); other objects raise TypeError."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (RuntimeError, ValueError):  # e.g. a tensor or array of more than one element
            pass
    raise TypeError(f"{type(value).__name__} {value!r:.60} is not JSON serialisable")


def _dumps(value, what: str, **kwargs) -> str:
    """Strict JSON text (no NaN/Infinity, which other JSON readers reject); errors name `what`."""
    try:
        return json.dumps(value, allow_nan=False, default=_plain, ensure_ascii=False, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} cannot be written as JSON: {err}") from None


def write_eval_json(path: Union[str, Path], metrics: dict) -> Path:
    """Write every metric to `path` (eval.json) as indented JSON, atomically; returns the path."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    return atomic_write_text(path, _dumps(metrics, f"metrics for {path}", indent=2) + "\n", fsync=True)


def generation_rows(references: Sequence[str], generations: Sequence[str], ids: Optional[Sequence] = None,
                    **fields: Sequence) -> list:
    """One dict per sample: id (its index when `ids` is None), reference, generation, then each extra field."""
    columns = {"references": references, "generations": generations, **fields}
    if ids is not None:
        columns["ids"] = ids
    for name, column in columns.items():
        if isinstance(column, (str, bytes, dict)) or not isinstance(column, Sequence):
            raise TypeError(f"{name} must be a sequence with one entry per sample, got {type(column).__name__}")
    for name in fields:
        if name in RESERVED_FIELDS:
            raise ValueError(f"extra field {name!r} would overwrite a standard column {RESERVED_FIELDS}")
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every column needs one entry per sample, got lengths {lengths}")
    ids = list(ids) if ids is not None else list(range(len(references)))
    return [{"id": ids[i], "reference": references[i], "generation": generations[i],
             **{name: column[i] for name, column in fields.items()}} for i in range(len(references))]


def write_generations(path: Union[str, Path], references: Sequence[str], generations: Sequence[str],
                      ids: Optional[Sequence] = None, **fields: Sequence) -> Path:
    """Write one JSON line per sample ({"id", "reference", "generation", **fields}) to `path`, atomically."""
    rows = generation_rows(references, generations, ids, **fields)
    lines = [_dumps(row, f"sample {index} (id={row['id']!r}) for {path}") for index, row in enumerate(rows)]
    return atomic_write_text(path, "".join(line + "\n" for line in lines), fsync=True)
