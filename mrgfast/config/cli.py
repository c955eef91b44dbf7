"""The one `key=value` command-line parser of mrgfast's CLIs (train, evaluate, onpolicy_pairs, demo).

Each CLI declares its own options as a dataclass; `parse_command_line` fills it from the arguments that name its
fields (converted and checked by the field's type, errors naming the key) and hands every other `key=value` on as
a training-config override (or refuses it, for a CLI that takes none).
"""

import dataclasses
import typing
from typing import Optional, Sequence

from mrgfast.config.parse import ConfigError, convert, suggest


def split_key_value(item: str) -> tuple[str, str]:
    """`key=value` (a leading `--` allowed) as (key, value); ConfigError otherwise."""
    if "=" not in item:
        raise ConfigError(f"argument {item!r}: expected key=value (e.g. optim.lr=3e-5) or config=path.yaml")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key:
        raise ConfigError(f"argument {item!r}: empty key before '='")
    return key, text


def parse_command_line(argv: Sequence[str], options_type, prefix: str = "", overrides: bool = True,
                       aliases: Optional[dict] = None) -> tuple:
    """(options_type instance, training-config overrides) from `key=value` arguments.

    A key naming a field of the dataclass `options_type` (with or without `prefix`, e.g. "demo.") sets it, at most
    once; a
    key in `aliases` becomes that config key's override (evaluate's `data=PATH` -> `data.path=PATH`); any other key
    is an override `key=value` when `overrides`, else a ConfigError listing the valid keys. Fields without a
    default must be given. The dataclass's own checks (ValueError) come back as ConfigError.
    """
    types = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    values, rest = {}, []
    for item in argv:
        key, text = split_key_value(item)
        name = key.removeprefix(prefix) if prefix else key
        if name in fields:
            if name in values:
                raise ConfigError(f"{key}= given twice ({values[name]!r} and {text!r})")
            values[name] = text
        elif aliases and key in aliases:
            rest.append(f"{aliases[key]}={text}")
        elif overrides:
            rest.append(f"{key}={text}")
        else:
            raise ConfigError(f"argument {item!r}: expected {prefix}<key>=value with key one of {sorted(fields)}"
                              f"{suggest(name, fields, prefix)}")
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("; ".join(f"{prefix}{name}= required" + (f": {fields[name].metadata['help']}"
                                                                   if "help" in fields[name].metadata else "")
                                    for name in missing))
    converted = {name: convert(text, types[name], prefix + name) for name, text in values.items()}
    try:
        return options_type(**converted), rest
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
