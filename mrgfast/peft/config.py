"""LoraConfig: PEFT's LoRA settings (same field names and meaning) and the adapter_config.json they map to."""

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

from mrgfast.layers.lora_linear import check_lora_hparams

CONFIG_NAME = "adapter_config.json"
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM", None)

# PEFT fields that change what an adapter computes and that mrgfast does not implement: loading a file that
# sets any of them to a non-default value is an error instead of a silently different model.
UNSUPPORTED_FIELDS = (
    "use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "target_parameters", "trainable_token_indices", "layer_replication",
    "alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config", "monteclora_config", "kasa_config",
    "megatron_config",
)
# init_lora_weights values that only decide the starting point of training (the saved A and B are complete);
# the others (pissa, olora, corda, loftq, ...) also rewrite the base weights, which mrgfast does not do.
PLAIN_INITS = (True, False, "gaussian")

NamePatterns = Optional[Union[list[str], str]]


def normalise_patterns(name: str, value: Any, allow_empty: bool = True) -> NamePatterns:
    """Validate a target/exclude list (exact-or-suffix names) or regex string; lists come back de-duplicated."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear":
            raise ValueError(f"{name}='all-linear' (PEFT's shorthand) is not supported; list the module names, "
                             "e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} is a string, so it is a regex (re.fullmatch on the module path), but "
                             f"{value!r} does not compile: {err}") from err
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty module names or a regex string, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty: list the module names to adapt, e.g. ['q_proj', 'v_proj']")
    return list(dict.fromkeys(value))


@dataclass
class LoraConfig:
    """LoRA settings with PEFT's field names; `to_dict()` is the adapter_config.json PEFT and vLLM read."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: NamePatterns = None
    exclude_modules: NamePatterns = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = "CAUSAL_LM"
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        try:
            check_lora_hparams(self.r, self.lora_alpha, self.lora_dropout)
        except ValueError as err:
            raise ValueError(f"LoraConfig.{err}") from err
        self.target_modules = normalise_patterns("LoraConfig.target_modules", self.target_modules, allow_empty=False)
        self.exclude_modules = normalise_patterns("LoraConfig.exclude_modules", self.exclude_modules)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be true or false, got {self.use_rslora!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {', '.join(map(repr, BIAS_CHOICES))}, got {self.bias!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not isinstance(self.modules_to_save, (list, tuple)) \
                    or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError("LoraConfig.modules_to_save must be a list of module names or None, "
                                 f"got {self.modules_to_save!r}")
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save)) or None
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be 'CAUSAL_LM' (or null), got {self.task_type!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError("LoraConfig.base_model_name_or_path must be a string or None, "
                             f"got {self.base_model_name_or_path!r}")

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json fields PEFT writes for this config (r and lora_alpha always present)."""
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": self.modules_to_save,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": True,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """A LoraConfig from PEFT's adapter_config.json fields; other PEFT fields are ignored unless they change
        what the adapter computes, which is an error naming `source` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; mrgfast loads only 'LORA' adapters")
        for name in UNSUPPORTED_FIELDS:
            if data.get(name):
                raise ValueError(f"{source}: {name}={data[name]!r} is not supported by mrgfast "
                                 f"(plain LoRA only; expected {name} false/null/empty)")
        init = data.get("init_lora_weights", True)
        if init not in PLAIN_INITS:
            raise ValueError(f"{source}: init_lora_weights={init!r} rewrites the base weights, which mrgfast does "
                             f"not do; expected one of {PLAIN_INITS}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # PEFT defaults a missing r / lora_alpha to 8, which is also this dataclass's default.
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "LoraConfig":
        """Read `adapter_config.json` from an adapter directory (or that file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{file}: no such file; expected an adapter directory holding {CONFIG_NAME}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(file))
