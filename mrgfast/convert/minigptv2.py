"""MiniGPT-v2's stage-3 checkpoint -> mrgfast's checkpoint layout, written once so runs start from safetensors.

OUT is a checkpoint directory as a run writes one (mrgfast.training.checkpoint, step 0, no optimizer state):
`modules.safetensors` holds the projector and ln_vision under the PeFoMed model's names, `adapter/` the LoRA
weights as a PEFT adapter (adapter_config.json + adapter_model.safetensors, PEFT's keys), `manifest.json` the
files' sha256. `model.init_from=OUT` loads it, and `peft.PeftModel.from_pretrained(llama, OUT/adapter)` loads the
adapter into transformers' Llama-2.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mrgfast.common.files import atomic_write
from mrgfast.config import parse_command_line
from mrgfast.peft import write_adapter
from mrgfast.training.checkpoint import ADAPTER_SUFFIX, MODULES_GROUP, write_contents
from mrgfast.training.minigptv2 import MiniGPTv2Weights, read_minigptv2

FORMAT = "minigptv2"


@dataclass
class MiniGPTv2Options:
    """`python -m mrgfast.convert minigptv2 SRC OUT [key=value ...]`."""

    src: str                                        # the MiniGPT-v2 .pth (state dict, or {"model": state dict})
    out: str                                        # the checkpoint directory to write (must not exist)
    group: int = 4                                  # vision tokens per visual token (MiniGPT-v2: 4, 1408 * 4 = 5632)
    base_model_name_or_path: Optional[str] = None   # recorded in adapter_config.json (e.g. the Llama-2-7b-chat path)

    def __post_init__(self):
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")


def convert_minigptv2(src, out, group: int = 4, base_model_name_or_path: Optional[str] = None) -> MiniGPTv2Weights:
    """Write the checkpoint directory `out` from the MiniGPT-v2 checkpoint `src`; returns what was read. Refuses an
    `out` that exists; written whole or not at all."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ValueError(f"{out}: exists; give a new directory to write the converted checkpoint into")
    weights = read_minigptv2(src)
    modules = weights.module_tensors(group)
    config = weights.lora_config(base_model_name_or_path)
    extra = {"converted_from": FORMAT, "source": str(src), "lora_r": weights.lora_r,
             "lora_alpha": weights.lora_alpha, "skipped": weights.skipped}
    with atomic_write(out, directory=True, mode=0o755, fsync=True) as temp:
        write_contents(temp, 0, {MODULES_GROUP: modules}, None, None, None, extra, [],
                       {ADAPTER_SUFFIX: lambda directory: write_adapter(directory, config, weights.adapter)}, {})
    return weights


def main(argv: list) -> int:
    """Convert as the arguments say (SRC and OUT positional or as src= / out=) and say what was written."""
    options, _ = parse_command_line(positional_as_keys(argv, ("src", "out")), MiniGPTv2Options, overrides=False)
    out = Path(options.out)
    weights = convert_minigptv2(options.src, out, options.group, options.base_model_name_or_path)
    modules = len({k.rsplit(".lora_", 1)[0] for k in weights.adapter})
    norm = "the file's" if weights.saved_ln_vision else "LayerNorm's initial weight 1 / bias 0"
    skipped = f"; skipped {len(weights.skipped)} RoPE inv_freq buffers" if weights.skipped else ""
    print(f"mrgfast.convert: wrote {out}: llama_proj {list(weights.projector['weight'].shape)} and ln_vision ({norm}) "
          f"in {MODULES_GROUP}.safetensors; LoRA r={weights.lora_r} alpha={weights.lora_alpha} on "
          f"{', '.join(weights.target_modules)} ({modules} modules) in {out / ADAPTER_SUFFIX}{skipped}",
          file=sys.stderr)
    return 0


def positional_as_keys(argv: list, names: tuple) -> list:
    """Arguments without '=' become `name=value` for `names` in order (SRC OUT); key=value arguments pass as they
    are. ValueError for more positional arguments than names."""
    result, free = [], list(names)
    for arg in argv:
        if "=" in arg:
            result.append(arg)
        elif free:
            result.append(f"{free.pop(0)}={arg}")
        else:
            raise ValueError(f"argument {arg!r}: expected {' '.join(n.upper() for n in names)} and key=value options")
    return result
