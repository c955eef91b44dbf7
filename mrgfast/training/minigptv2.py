"""MiniGPT-v2 checkpoints (the stage-3 `.pth` PeFoMed fine-tunes from): read them, name their tensors as mrgfast's
PeFoMed model and PEFT name them, and load them into a model.

What the file holds, read from Vision-CAIR/MiniGPT-4 (README, "PeFoMed: start from MiniGPT-v2"): the runner's
`_save_checkpoint` saves `{"model": state_dict, "optimizer", "config", "scaler", "epoch"}` and drops from the state
dict every parameter that does not require grad, so "model" holds the trained ones only:

- `llama_proj.weight` [4096, 5632], `llama_proj.bias` [4096] (minigpt_v2.py: Linear(1408 * 4, hidden));
- `llama_model.base_model.model.<HF path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] on every q_proj and
  v_proj (base_model.py's init_llm: peft's get_peft_model, LoraConfig(r=64, lora_alpha=16, dropout 0.05)). peft 0.2.0,
  which MiniGPT-v2's environment.yml pins, names them so; peft >= 0.3 inserts the adapter name (`.lora_A.default.`):
  both are read;
- `llama_model.base_model.model.model.layers.N.self_attn.rotary_emb.inv_freq`: transformers 4.30's (pinned) RoPE
  frequencies, a persistent buffer that the filter above keeps because it is no parameter; mrgfast recomputes
  them, so they are skipped.

`ln_vision` is in no file: base_model.py's init_vision_encoder makes it a fresh LayerNorm(1408) (eps 1e-5) and
freezes it, so it stays at its initial weight 1 / bias 0 and is never saved; eva_vit.py's create_eva_vit_g loads
eva_vit_g.pth into the ViT alone, so nothing of that file reaches it. Loading sets the projector's LayerNorm to
exactly that, or to `ln_vision.weight` / `.bias` where a file holds them (a variant that trained it).
"""

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from mrgfast.common.names import few
from mrgfast.peft.adapter_io import KEY_PREFIX, adapter_state_dict
from mrgfast.peft.config import LoraConfig
from mrgfast.peft.state import get_lora_state

PROJ_WEIGHT, PROJ_BIAS = "llama_proj.weight", "llama_proj.bias"
LN_VISION = ("ln_vision.weight", "ln_vision.bias")  # only in a variant that trained it (MiniGPT-v2 freezes it)
LLM_PREFIX = "llama_model."                     # MiniGPT's attribute holding the PeftModel
LORA_KEY = re.compile(r"^llama_model\.base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])(?P<name>\.default)?"
                      r"\.weight$")
ROPE_BUFFER = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# MiniGPT-v2's defaults (minigpt_v2.py: from_config reads lora_r / lora_alpha from the model config, 64 / 16 when
# absent; lora_dropout is never passed on, so its __init__ default 0.05 holds).
DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT = 16, 0.05
LN_VISION_EPS = 1e-5                            # base_model.py's LayerNorm(num_features): nn.LayerNorm's default eps
PROJECTOR = "adapters.image"                    # where mrgfast's PeFoMed recipe keeps its GroupedProjection
MODULE_NAMES = tuple(f"{PROJECTOR}.{part}.{name}" for part in ("proj", "norm") for name in ("weight", "bias"))


@dataclass
class MiniGPTv2Weights:
    """A MiniGPT-v2 checkpoint's tensors, named for mrgfast: the projector (and ln_vision) and the LoRA adapter
    (PEFT's keys)."""

    path: Path
    projector: dict[str, Tensor]                # {"weight": [hidden, group * vision], "bias": [hidden]}
    adapter: dict[str, Tensor]                  # PEFT keys: base_model.model.<path>.lora_A.weight ...
    source_keys: dict[str, str]                 # PEFT key -> the key it had in the file
    lora_r: int
    lora_alpha: int
    target_modules: list[str]
    skipped: list[str] = field(default_factory=list)  # RoPE buffers in the file, recomputed by mrgfast
    saved_ln_vision: Optional[dict[str, Tensor]] = None  # {"weight", "bias"} where the file holds them

    def ln_vision(self, dim: int) -> dict[str, Tensor]:
        """ln_vision over `dim` features: the file's, else MiniGPT-v2's frozen one, LayerNorm's initial weight 1 and
        bias 0 (never trained, never saved)."""
        if self.saved_ln_vision is not None:
            return self.saved_ln_vision
        dtype = self.projector["weight"].dtype
        return {"weight": torch.ones(dim, dtype=dtype), "bias": torch.zeros(dim, dtype=dtype)}

    def module_tensors(self, group: int) -> dict[str, Tensor]:
        """The projector and ln_vision under mrgfast's PeFoMed names (a checkpoint's `modules` group), for a
        projector that concatenates `group` vision tokens."""
        width = self.projector["weight"].shape[1]
        if width % group:
            raise ValueError(f"{self.path}: {PROJ_WEIGHT} takes {width} features, not a multiple of the group of "
                             f"{group} vision tokens")
        tensors = {f"{PROJECTOR}.proj.{name}": t for name, t in self.projector.items()}
        tensors.update({f"{PROJECTOR}.norm.{name}": t for name, t in self.ln_vision(width // group).items()})
        return tensors

    def lora_config(self, base_model_name_or_path: Optional[str] = None) -> LoraConfig:
        """The LoraConfig MiniGPT-v2 trained these weights with (bias "none", as init_llm sets)."""
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=DEFAULT_LORA_DROPOUT,
                          target_modules=self.target_modules, bias="none",
                          base_model_name_or_path=base_model_name_or_path)


def load_state_dict(path: Path) -> tuple[dict, dict]:
    """(the state dict, the runner's config or {}) of a `.pth` holding a raw state dict or {"model": state dict};
    unpickled with weights_only (tensors and plain containers only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a loadable torch checkpoint, or it holds more than tensors and plain "
                         f"containers (torch.load with weights_only=True: {first})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        config = loaded.get("config")
        return loaded["model"], config if isinstance(config, dict) else {}
    if isinstance(loaded, dict) and loaded and all(isinstance(k, str) for k in loaded):
        return loaded, {}
    raise ValueError(f"{path}: expected a state dict or {{'model': state dict}}, found a {type(loaded).__name__}")


def read_minigptv2(path) -> MiniGPTv2Weights:
    """The projector and LoRA tensors of a MiniGPT-v2 checkpoint; ValueError naming the file for anything else in it,
    for what is missing, or for a file that is not MiniGPT-v2's."""
    path = Path(path)
    state, run_config = load_state_dict(path)
    if PROJ_WEIGHT not in state and not any(k.startswith(LLM_PREFIX) for k in state):
        raise ValueError(f"{path}: not a MiniGPT-v2 checkpoint (no {PROJ_WEIGHT} and no {LLM_PREFIX}* keys); its keys: "
                         f"{few(sorted(state), 5)} ({len(state)} in all)")
    adapter, sources, skipped, unexpected = {}, {}, [], []
    for key, value in state.items():
        match = LORA_KEY.match(key)
        if key in (PROJ_WEIGHT, PROJ_BIAS) or key in LN_VISION:
            continue
        if ROPE_BUFFER.match(key):
            skipped.append(key)
        elif match and isinstance(value, Tensor):
            peft_key = f"{KEY_PREFIX}{match['path']}.lora_{match['part']}.weight"
            if peft_key in adapter:
                raise ValueError(f"{path}: {key} and {sources[peft_key]} are the same LoRA weight")
            adapter[peft_key], sources[peft_key] = value, key
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} key(s) neither the projector nor LoRA: "
                         f"{few(sorted(unexpected), 5)}")
    missing = [k for k in (PROJ_WEIGHT, PROJ_BIAS) if k not in state]
    for peft_key in adapter:  # every LoRA layer needs both halves
        other = peft_key.replace(".lora_A.", ".lora_B.") if ".lora_A." in peft_key else \
            peft_key.replace(".lora_B.", ".lora_A.")
        if other not in adapter:
            missing.append(source_name(other, sources[peft_key]))
    if any(k in state for k in LN_VISION):
        missing += [k for k in LN_VISION if k not in state]
    if not adapter:
        missing.append(f"{LLM_PREFIX}base_model.model.<layer>.lora_A.weight (no LoRA weights at all)")
    if missing:
        raise ValueError(f"{path}: {len(missing)} key(s) missing: {few(sorted(missing), 5)}")
    projector = {"weight": state[PROJ_WEIGHT], "bias": state[PROJ_BIAS]}
    check_projector(path, projector)
    r = lora_rank(path, adapter, sources)
    alpha = lora_setting(path, run_config, "lora_alpha", DEFAULT_LORA_ALPHA)
    saved_r = lora_setting(path, run_config, "lora_r", r)
    if saved_r != r:
        raise ValueError(f"{path}: its config says lora_r={saved_r}, but its LoRA weights have rank {r}")
    targets = sorted({k[len(KEY_PREFIX):].split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter})
    saved_norm = {k.split(".")[-1]: state[k] for k in LN_VISION} if LN_VISION[0] in state else None
    return MiniGPTv2Weights(path, projector, adapter, sources, r, alpha, targets, sorted(skipped), saved_norm)


def source_name(peft_key: str, like: str) -> str:
    """`peft_key` as the file would name it, with or without the adapter name as `like` has it."""
    path, part = peft_key[len(KEY_PREFIX):].rsplit(".lora_", 1)
    name = ".default" if ".default." in like else ""
    return f"{LLM_PREFIX}base_model.model.{path}.lora_{part[0]}{name}.weight"


def check_projector(path: Path, projector: dict) -> None:
    """ValueError unless llama_proj is a Linear's weight [out, in] and bias [out]."""
    weight, bias = projector["weight"], projector["bias"]
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor) or weight.dim() != 2 \
            or tuple(bias.shape) != (weight.shape[0],):
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (weight, bias)]
        raise ValueError(f"{path}: {PROJ_WEIGHT} / {PROJ_BIAS} have shapes {shapes[0]} / {shapes[1]}; expected "
                         "[out, in] / [out]")


def lora_rank(path: Path, adapter: dict, sources: dict) -> int:
    """The one rank of every LoRA pair (A [r, in], B [out, r]); ValueError naming a key that disagrees."""
    ranks = {}
    for key, t in adapter.items():
        if t.dim() != 2:
            raise ValueError(f"{path}: {sources[key]} has shape {tuple(t.shape)}; expected a matrix")
        ranks[key] = t.shape[0] if ".lora_A." in key else t.shape[1]
    r = ranks[min(ranks)]
    odd = sorted(sources[k] for k, v in ranks.items() if v != r)
    if odd:
        raise ValueError(f"{path}: LoRA ranks differ ({sources[min(ranks)]} has {r}): {few(odd, 5)}")
    return r


def lora_setting(path: Path, run_config: dict, name: str, default: int) -> int:
    """A LoRA setting from the runner's saved config (config.model.<name>) when it has one, else `default`."""
    model = run_config.get("model") if isinstance(run_config.get("model"), dict) else {}
    value = model.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{path}: config.model.{name} is {value!r}; expected a positive number")
    return int(value) if float(value).is_integer() else value


def load_minigptv2(model: nn.Module, source) -> MiniGPTv2Weights:
    """Load a MiniGPT-v2 checkpoint (a path, or read_minigptv2's result) into a PeFoMed MultimodalLM: llama_proj into
    the projector's Linear, ln_vision's initial values into its LayerNorm, the LoRA weights into the decoder's
    adapter. Everything is checked (keys, shapes, LoRA alpha) before anything is copied: on an error the model is as
    it was."""
    weights = source if isinstance(source, MiniGPTv2Weights) else read_minigptv2(source)
    projector = model.get_submodule(PROJECTOR) if has_submodule(model, PROJECTOR) else None
    norm, proj = getattr(projector, "norm", None), getattr(projector, "proj", None)
    if not isinstance(norm, nn.LayerNorm) or not isinstance(proj, nn.Linear):
        raise ValueError(f"{weights.path}: a MiniGPT-v2 checkpoint loads into PeFoMed's projector (LayerNorm -> "
                         f"group -> Linear at {PROJECTOR}); this model has {type(projector).__name__} there")
    if norm.eps != LN_VISION_EPS:
        raise ValueError(f"{weights.path}: MiniGPT-v2's ln_vision has eps {LN_VISION_EPS}; the projector's "
                         f"LayerNorm has {norm.eps}")
    group = proj.in_features // norm.normalized_shape[0]
    modules = weights.module_tensors(group)
    params = dict(model.named_parameters())
    for name, value in modules.items():
        if tuple(value.shape) != tuple(params[name].shape):
            source = PROJ_WEIGHT if name.endswith("proj.weight") else PROJ_BIAS if name.endswith("proj.bias") \
                else f"ln_vision (from {PROJ_WEIGHT}'s width)"
            raise ValueError(f"{weights.path}: {source} has shape {tuple(value.shape)}, the model's {name} "
                             f"expects {tuple(params[name].shape)}")
    targets = checked_lora_targets(model.decoder, weights)
    with torch.no_grad():
        for name, value in modules.items():
            params[name].copy_(value)
        for key, target in targets.items():
            target.copy_(weights.adapter[key])
    return weights


def has_submodule(model: nn.Module, name: str) -> bool:
    """Whether `model` has a submodule at the dotted `name`."""
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def checked_lora_targets(decoder: nn.Module, weights: MiniGPTv2Weights) -> dict[str, Tensor]:
    """The decoder's adapter tensors by PEFT key, after checking they are exactly the file's LoRA weights (keys,
    shapes, alpha); ValueError naming the file and the keys (as the file names them) otherwise."""
    state = get_lora_state(decoder)
    if state is None:
        raise ValueError(f"{weights.path}: holds LoRA weights but the model has no LoRA (set lora.enabled=true, "
                         f"r={weights.lora_r}, lora_alpha={weights.lora_alpha}, target_modules="
                         f"{weights.target_modules})")
    if state.config.lora_alpha != weights.lora_alpha or state.config.use_rslora:
        raise ValueError(f"{weights.path}: MiniGPT-v2 trained its LoRA with lora_alpha={weights.lora_alpha} (scale "
                         f"alpha/r); the model's LoRA has lora_alpha={state.config.lora_alpha}"
                         f"{' with use_rslora' if state.config.use_rslora else ''}, which would scale it differently")
    targets = adapter_state_dict(decoder)
    like = next(iter(weights.source_keys.values()))  # the file's naming (with or without the adapter name)
    missing = sorted(source_name(k, like) for k in set(targets) - set(weights.adapter))
    unexpected = sorted(weights.source_keys[k] for k in set(weights.adapter) - set(targets))
    parts = []
    if missing:
        parts.append(f"{len(missing)} LoRA key(s) the model has and the file lacks: {few(missing, 5)}")
    if unexpected:
        parts.append(f"{len(unexpected)} LoRA key(s) the model has no place for: {few(unexpected, 5)}")
    if parts:
        raise ValueError(f"{weights.path}: {'; '.join(parts)}")
    for key, target in targets.items():
        if weights.adapter[key].shape != target.shape:
            raise ValueError(f"{weights.path}: {weights.source_keys[key]} has shape "
                             f"{tuple(weights.adapter[key].shape)}, the model's LoRA expects {tuple(target.shape)}")
    return targets
