"""Synthetic MiniGPT-v2 stage-3 checkpoints in the exact layout of Vision-CAIR/MiniGPT-4's runner (README, "PeFoMed:
start from MiniGPT-v2"), at the test suite's tiny sizes: a 2-layer decoder of hidden 64 (4 heads, 2 KV heads of 16:
v_proj out 32) and a projector over 4 vision tokens of 32 features."""

from pathlib import Path

import torch

from mrgfast.config import load_config
from tests.tiny_run import CONFIGS

HIDDEN, KV_OUT, VISION, GROUP, LAYERS, RANK = 64, 32, 32, 4, 2, 8


def lora_key(layer: int, module: str, part: str, adapter_name: bool = False) -> str:
    """A LoRA weight's key as MiniGPT-v2's state dict has it (peft 0.2.0; `adapter_name`: peft >= 0.3's)."""
    name = ".default" if adapter_name else ""
    return f"llama_model.base_model.model.model.layers.{layer}.self_attn.{module}.lora_{part}{name}.weight"


def minigptv2_state(layers: int = LAYERS, rank: int = RANK, width: int = VISION * GROUP, adapter_name: bool = False,
                    inv_freq: bool = True, seed: int = 0, dtype=torch.float32) -> dict:
    """The trained tensors MiniGPT-v2's _save_checkpoint keeps: llama_proj, LoRA on q_proj / v_proj, and (with
    transformers 4.30) each layer's rotary inv_freq buffer; random values, B included."""
    g = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(HIDDEN, width, generator=g).to(dtype),
             "llama_proj.bias": torch.randn(HIDDEN, generator=g).to(dtype)}
    for layer in range(layers):
        for module, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            state[lora_key(layer, module, "A", adapter_name)] = (torch.randn(rank, HIDDEN, generator=g) * 0.2).to(dtype)
            state[lora_key(layer, module, "B", adapter_name)] = (torch.randn(out, rank, generator=g) * 0.2).to(dtype)
        if inv_freq:
            head = HIDDEN // 4
            state[f"llama_model.base_model.model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = \
                1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
    return state


def save_minigptv2(path: Path, state: dict, wrapped: bool = True, lora_alpha=16, lora_r=RANK) -> Path:
    """torch.save the state dict as the runner does ({"model", "optimizer", "config", "scaler", "epoch"}), or raw."""
    if wrapped:
        config = {"model": {"arch": "minigpt_v2", "lora_r": lora_r, "lora_alpha": lora_alpha, "image_size": 448},
                  "run": {"init_lr": 1e-5}}
        optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                     "param_groups": [{"lr": 1e-5, "params": [0]}]}
        torch.save({"model": state, "optimizer": optimizer, "config": config, "scaler": None, "epoch": 2}, path)
    else:
        torch.save(state, path)
    return path


def pefomed_config(cache: Path, out: Path, *extra):
    """The tiny PeFoMed recipe (pefomed_stage1 at the sizes above, LoRA r=RANK alpha 16) writing to `out`."""
    overrides = [f"output_dir={out}", f"data.cache_dir={cache}", "data.synthetic_n=12", "data.rows=1",
                 "schedule.max_steps=2", "schedule.warmup_ratio=0", "schedule.warmup_steps=0",
                 "checkpoint.every_steps=100", "telemetry.progress_bar=false", "telemetry.tensorboard=false",
                 "telemetry.log_every=1", "resume=none", f"lora.r={RANK}", f"model.hidden_size={HIDDEN}",
                 f"model.vision_dim={VISION}", f"model.group_size={GROUP}", f"model.num_hidden_layers={LAYERS}"]
    return load_config(CONFIGS / "pefomed_stage1.yaml", overrides + list(extra))
