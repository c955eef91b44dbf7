"""JSON / JSONL loading and field access that fail with the file, the entry and the expected type."""

import json
from pathlib import Path
from typing import Any

from mrgfast.data.errors import DataFormatError

_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer"}


def load_json(path) -> Any:
    """Parse a JSON file; a missing file or a syntax error raises naming the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_json_list(path: Path, entries: str) -> list:
    """The JSON list in `path` (load_json), or a DataFormatError naming the file and the `entries` it should list."""
    data = load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a list of {entries}, got {type(data).__name__}")
    return data


def read_jsonl(path) -> list:
    """Parse a JSON-lines file into (line number, object) pairs; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {number} is not valid JSON (column {err.colno}: {err.msg})") from None
    return rows


def get_field(entry: Any, name: str, kind, where: str, required_fields=()) -> Any:
    """entry[name] checked to be of `kind` (a type or tuple of types); errors name the entry and field."""
    if not isinstance(entry, dict):
        raise DataFormatError(f"{where}: expected an object with fields {list(required_fields) or [name]}, "
                              f"got {type(entry).__name__} {_short(entry)}")
    if name not in entry:
        ident = entry.get("id", entry.get("qid"))
        label = f" (id={ident})" if ident is not None else ""
        fields = list(required_fields) or [name]
        raise DataFormatError(f"{where}{label}: missing field {name!r} (expected fields {fields})")
    value = entry[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise DataFormatError(f"{where}: field {name!r} must be {names}, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    """A repr cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
