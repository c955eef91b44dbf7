"""Which module paths a LoraConfig targets, excludes and saves: PEFT's matching rules, reproduced exactly."""

import re

from mrgfast.peft.config import LoraConfig, NamePatterns


def matches_patterns(patterns: NamePatterns, key: str) -> bool:
    """PEFT's rule: a str is a regex fullmatched against the whole path; a list entry matches the path exactly
    or as the suffix after a '.' (so 'q_proj' matches 'model.layers.0.self_attn.q_proj')."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return key in patterns or any(key.endswith(f".{p}") for p in patterns)


def matches_modules_to_save(modules_to_save, key: str) -> bool:
    """PEFT's modules_to_save rule: the path ends with the name (a plain string suffix, no '.' needed)."""
    return bool(modules_to_save) and any(key.endswith(m) for m in modules_to_save)


def under_modules_to_save(modules_to_save, key: str) -> bool:
    """Whether `key` is a module to save or lies inside one; PEFT never puts LoRA there."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


def is_lora_target(config: LoraConfig, key: str) -> bool:
    """PEFT's check_target_module_exists for plain LoRA: excluded first, then modules_to_save, then targets."""
    if matches_patterns(config.exclude_modules, key):
        return False
    if under_modules_to_save(config.modules_to_save, key):
        return False
    return matches_patterns(config.target_modules, key)
