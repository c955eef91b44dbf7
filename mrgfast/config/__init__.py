"""Run configuration: typed dataclasses read from YAML (`base:` inheritance) and `key=value` overrides, and the one
command-line parser every CLI uses.

parse: the typed machinery (conversion, YAML, dotted keys, ConfigError); train_config: TrainConfig and its sections;
cli: `key=value` arguments -> a CLI's options dataclass + config overrides; resume_changes: what a resumed run may
change against its checkpoint's config.
"""

from mrgfast.config.cli import parse_command_line, split_key_value
from mrgfast.config.parse import ConfigError, convert
from mrgfast.config.resume_changes import check_resume_changes
from mrgfast.config.train_config import (RESOLVED_NAME, RESUMED_NAME, TrainConfig, config_text, config_to_dict,
                                         load_config, parse_cli, save_resolved)

__all__ = ["ConfigError", "RESOLVED_NAME", "RESUMED_NAME", "TrainConfig", "check_resume_changes", "config_text",
           "config_to_dict", "convert", "load_config", "parse_cli", "parse_command_line", "save_resolved",
           "split_key_value"]
