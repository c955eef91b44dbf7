"""Typed config machinery: nested dataclasses from YAML files (with `base:` inheritance) and `key=value` overrides."""

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mrgfast.common.exit_codes import CONFIG

BASE_KEY = "base"
NULL_WORDS = ("null", "none", "~")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A config key or value is wrong: the message names the key and what was expected."""

    exit_code = CONFIG


def describe_type(tp) -> str:
    """A short human description of a field type, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else describe_type(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def section_types(cls) -> dict[str, Any]:
    """The resolved field types of a config dataclass."""
    return typing.get_type_hints(cls)


def suggest(name: str, choices, prefix: str = "") -> str:
    """'; did you mean <prefix>X?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def convert(value: Any, tp, key: str) -> Any:
    """`value` (a YAML object, or the text of a command-line override) checked and converted to type `tp`."""
    try:
        return convert_inner(value, tp)
    except (TypeError, ValueError) as err:
        reason = f" ({err})" if str(err) and not isinstance(err, TypeError) else ""
        raise ConfigError(f"config key {key!r}: expected {describe_type(tp)}, got {value!r}{reason}") from None


def convert_inner(value: Any, tp) -> Any:
    """convert() without the key: raises TypeError/ValueError when `value` does not fit `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_WORDS):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_inner(value, arg)
            except (TypeError, ValueError):
                pass
        raise TypeError("no alternative fits")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise TypeError("not an allowed value")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = split_list(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return [convert_inner(item, args[0]) for item in value] if args else list(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise TypeError("not a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise TypeError("not a boolean")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip().replace("_", ""))
        raise TypeError("not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `3e-5` (no dot) as a string, so YAML floats arrive here as text too.
            return float(value.strip())
        raise TypeError("not a number")
    if tp is str:
        if isinstance(value, str):
            return strip_quotes(value)
        raise TypeError("not a string")
    raise TypeError(f"unsupported field type {tp}")


def strip_quotes(text: str) -> str:
    """Text without one pair of matching surrounding quotes (a shell may pass `key='a b'` through)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def split_list(text: str) -> list[str]:
    """`[a, b]` or `a,b` as ['a', 'b']; `[]` or '' as []."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [strip_quotes(part.strip()) for part in text.split(",") if part.strip()]


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A YAML config file as a dict, with the files named by `base:` merged underneath it (paths relative)."""
    path = Path(path)
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in seen + (path.resolve(),))
        raise ConfigError(f"{path}: `base:` inheritance loops: {chain}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `base:` must be a file path or a list of them, got {base!r}")
    merged: dict = {}
    for name in bases:
        merged = deep_merge(merged, read_yaml(path.parent / name, seen + (path.resolve(),)))
    return deep_merge(merged, data)


def deep_merge(under: dict, over: dict) -> dict:
    """`over` laid on `under`: mappings merge key by key, anything else replaces."""
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_mapping(cls, data: dict, prefix: str = "", construct: bool = True) -> dict:
    """A nested mapping checked against dataclass `cls` into constructor kwargs (sub-sections built unless
    not `construct`, when only keys and value types are checked)."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"config section {where!r}: expected a mapping, got {data!r}")
    types = section_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise ConfigError(f"unknown config key {key!r}{suggest(str(name), types, prefix)} "
                              f"(valid keys here: {', '.join(types)})")
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{key}.") if construct else apply_mapping(tp, value, f"{key}.", False)
        else:
            kwargs[name] = convert(value, tp, key)
    return kwargs


def build(cls, data: dict, prefix: str = ""):
    """An instance of config dataclass `cls` from a nested mapping; the section's own checks name the key."""
    kwargs = apply_mapping(cls, data, prefix)
    for field in dataclasses.fields(cls):
        if field.name not in kwargs and dataclasses.is_dataclass(section_types(cls)[field.name]):
            kwargs[field.name] = build(section_types(cls)[field.name], {}, f"{prefix}{field.name}.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'!r}: {err}") from err


def is_config_key(cls, dotted: str) -> bool:
    """Whether `dotted` names a key or a section of the config dataclass `cls` (e.g. 'optim.lr', 'schedule')."""
    section = cls
    for part in dotted.split("."):
        if section is None or part not in section_types(section):
            return False
        tp = section_types(section)[part]
        section = tp if dataclasses.is_dataclass(tp) else None
    return True


def suggest_key(cls, dotted: str) -> str:
    """'; did you mean X?' for the closest valid name at the first part of `dotted` that is no key, or ''."""
    parts, section = dotted.split("."), cls
    for depth, part in enumerate(parts):
        types = section_types(section)
        if part not in types:
            return suggest(part, types, ".".join(parts[:depth]) + "." if depth else "")
        section = types[part]
        if not dataclasses.is_dataclass(section):
            return ""
    return ""


def set_dotted(data: dict, key: str, text: str, cls) -> None:
    """Place override `key=text` into the nested mapping `data`, checking the key path against `cls`."""
    parts = key.split(".")
    node, section = data, cls
    for depth, part in enumerate(parts):
        types = section_types(section)
        so_far = ".".join(parts[:depth + 1])
        if part not in types:
            raise ConfigError(f"unknown config key {so_far!r}{suggest(part, types, so_far[:-len(part)])} "
                              f"(valid keys here: {', '.join(types)})")
        tp = types[part]
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. "
                                  f"{key}.{next(iter(section_types(tp)))}=...")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config section {so_far!r}: expected a mapping, got {node!r}")
            section = tp
        elif not last:
            raise ConfigError(f"config key {so_far!r} is a value, not a section; cannot set {key!r}")
        else:
            # Checked now so the error names the override; build() converts the text again, which is idempotent.
            convert(text, tp, key)
            node[part] = text


def to_plain(obj) -> Any:
    """A config dataclass as nested plain dicts/lists (what save and YAML need)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
