"""EVA ViT-g/14 (the vision tower of BLIP-2, MiniGPT-4/v2 and PeFoMed) as a timm `Eva`, read from either layout:

- timm's: a directory written by `timm.models.save_for_hf` (config.json with `architecture` eva_* and `model_args`,
  plus model.safetensors);
- LAVIS's: `eva_vit_g.pth` (a plain state dict; the file MiniGPT-v2 and PeFoMed load), or a directory holding it.
  LAVIS's key names are timm's (patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.q_bias,
  attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2, gamma_1/gamma_2 when layer-scaled}); only the architecture has to
  be recovered, from the tensor shapes.

timm is imported here only, when an EVA is loaded (the `eva` extra). The encoder stops after the blocks the selected
layer needs and applies no final norm: BLIP-2's convention (see BLIP2_SELECT_LAYER).
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mrgfast.common.names import few, key_mismatch

TIMM_WEIGHTS = "model.safetensors"
LAVIS_FILE = "eva_vit_g.pth"
# BLIP-2 (LAVIS create_eva_vit_g) builds VisionTransformer(depth=39) from the 40-block EVA-CLIP-g weights, loads
# them with strict=False (block 39 is dropped) and has no final norm (forward_features returns the last block's
# tokens): its features are hidden_states[-2] of the 40-block tower, HF's counting. MiniGPT-v2 / PeFoMed then apply
# ln_vision (a LayerNorm they own; mrgfast: the projector's GroupedProjection.norm) and drop the class token
# (image_embeds[:, 1:, :]) before grouping 4 consecutive tokens.
BLIP2_SELECT_LAYER = -2
# LAVIS create_eva_vit_g: num_heads = 1408 // 88 (ViT-g/14: width 1408, 40 blocks, 16 heads, MLP 6144).
VIT_G_HEAD_DIM = 88
LAVIS_ARCHITECTURE = "eva_giant_patch14_224"  # timm's EVA-g: pre-norm blocks, fused qkv + q/v bias, abs pos + CLS
# Parts of a whole EVA checkpoint that no block output uses: timm's final norm, pooling and head (EVA-CLIP's
# projection head too). The blocks after the selected layer are dropped as well, as LAVIS does.
UNUSED = re.compile(r"^(norm|fc_norm|head|attn_pool)\.")
BLOCK = re.compile(r"^blocks\.(\d+)\.")
# BLIP-2's image processor (Blip2ImageEvalProcessor): OpenAI CLIP mean / std, bicubic resize.
BLIP2_PREPROCESS = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                        resample="bicubic")
# timm model_args that describe a classifier, not the encoder mrgfast builds (it sets them itself).
OWN_ARGS = ("img_size", "num_classes", "global_pool", "use_fc_norm", "use_post_transformer_norm", "depth")


@dataclass
class EvaCheckpoint:
    """An EVA checkpoint read from disk: its tensors (timm names), the timm architecture and arguments that build it,
    the total block count, the image size it was trained at and its preprocessing."""

    file: Path
    layout: str
    state: dict
    architecture: str
    model_args: dict
    depth: int
    image_size: int
    patch_size: int
    preprocess: dict


def find_eva(path) -> Optional[tuple[str, Path]]:
    """(layout, file) when `path` holds an EVA ("timm": the directory, "lavis": the .pth), else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pth":
        return "lavis", path
    if (path / LAVIS_FILE).is_file():
        return "lavis", path / LAVIS_FILE
    config = path / "config.json"
    if config.is_file():
        try:
            architecture = json.loads(config.read_text()).get("architecture")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(architecture, str) and architecture.startswith("eva"):
            return "timm", path
    return None


def read_eva(path) -> EvaCheckpoint:
    """The EVA checkpoint at `path` (either layout); ValueError naming the file when it is not one."""
    found = find_eva(path)
    if found is None:
        raise ValueError(f"{path}: not an EVA checkpoint (expected a timm save_for_hf directory whose config.json "
                         f"names an eva_* architecture, or LAVIS's {LAVIS_FILE})")
    layout, file = found
    if layout == "timm":
        return _read_timm(file)
    return _read_lavis(file)


def _read_timm(path: Path) -> EvaCheckpoint:
    """A save_for_hf directory: architecture and model_args from config.json, tensors from model.safetensors."""
    config_file, weights = path / "config.json", path / TIMM_WEIGHTS
    config = json.loads(config_file.read_text())
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: a timm EVA directory holds config.json + {TIMM_WEIGHTS}")
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ValueError(f"{config_file}: 'model_args' must be an object of timm model arguments, got "
                         f"{model_args!r}")
    state = load_file(str(weights))
    shapes = eva_shapes(state, weights)
    if "depth" in model_args and model_args["depth"] != shapes["depth"]:
        raise ValueError(f"{config_file}: model_args depth={model_args['depth']}, but {weights} holds "
                         f"{shapes['depth']} blocks")
    pretrained = config.get("pretrained_cfg") or {}
    preprocess = dict(BLIP2_PREPROCESS)
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("resample", "interpolation")):
        if pretrained.get(theirs) is not None:
            value = pretrained[theirs]
            preprocess[ours] = tuple(float(v) for v in value) if ours != "resample" else value
    args = {k: v for k, v in model_args.items() if k not in OWN_ARGS}
    return EvaCheckpoint(weights, "timm", state, config["architecture"], args, shapes["depth"],
                         shapes["grid"] * shapes["patch"], shapes["patch"], preprocess)


def _read_lavis(file: Path) -> EvaCheckpoint:
    """LAVIS's eva_vit_g.pth: a plain state dict in timm's names; the architecture from its shapes (heads from a
    config.json beside it when given, else the ViT-g head width)."""
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{file}: expected a plain state dict (name -> tensor) as LAVIS saves eva_vit_g.pth, got "
                         f"{type(state).__name__}")
    shapes = eva_shapes(state, file)
    args = lavis_model_args(state, shapes, file, _lavis_config(file).get("num_heads"))
    return EvaCheckpoint(file, "lavis", state, LAVIS_ARCHITECTURE, args, shapes["depth"],
                         shapes["grid"] * shapes["patch"], shapes["patch"], dict(BLIP2_PREPROCESS))


def lavis_model_args(state: dict, shapes: dict, file: Path, heads: Optional[int] = None) -> dict:
    """timm Eva arguments of a LAVIS state dict: width, patch, channels, MLP width and layer scale from the tensors;
    heads as given, else width / 88 (ViT-g/14: 1408 -> 16 heads)."""
    width = shapes["width"]
    if heads is None:
        if width % VIT_G_HEAD_DIM:
            raise ValueError(f"{file}: width {width} is not a multiple of ViT-g's head width {VIT_G_HEAD_DIM}; give "
                             f"the head count as model_args.num_heads in {file.parent / 'config.json'}")
        heads = width // VIT_G_HEAD_DIM
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] if shapes["depth"] else 4 * width
    args = dict(embed_dim=width, num_heads=heads, mlp_ratio=mlp / width, patch_size=shapes["patch"],
                in_chans=shapes["channels"])
    if "blocks.0.gamma_1" in state:
        args["init_values"] = 1.0  # layer scale present (its trained values are loaded)
    return args


def _lavis_config(file: Path) -> dict:
    """model_args of an optional config.json beside a LAVIS .pth (for widths that are not ViT-g's, e.g. tests)."""
    config_file = file.parent / "config.json"
    if not config_file.is_file():
        return {}
    try:
        args = json.loads(config_file.read_text()).get("model_args", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file}: expected a JSON object with 'model_args': {err}") from None
    return args if isinstance(args, dict) else {}


def eva_shapes(state: dict, file: Path) -> dict:
    """width, block count, patch size, input channels and position grid side of an EVA state dict."""
    needed = ["patch_embed.proj.weight", "pos_embed", "cls_token"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{file}: not an EVA ViT state dict; it lacks {few(missing)} (has {few(sorted(state))})")
    proj, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    if proj.dim() != 4 or pos.dim() != 3 or proj.shape[-1] != proj.shape[-2]:
        raise ValueError(f"{file}: patch_embed.proj.weight {tuple(proj.shape)} / pos_embed {tuple(pos.shape)} are not "
                         "a square-patch ViT's [width, channels, p, p] / [1, 1 + h*w, width]")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"{file}: pos_embed has {pos.shape[1]} positions, not a class token plus a square grid")
    blocks = {int(m.group(1)) for m in map(BLOCK.match, state) if m}
    depth = max(blocks) + 1 if blocks else 0
    if blocks != set(range(depth)):
        raise ValueError(f"{file}: blocks {sorted(set(range(depth)) - blocks)} are missing")
    return dict(width=pos.shape[-1], depth=depth, patch=proj.shape[-1], channels=proj.shape[1], grid=grid)


class EvaEncoder(nn.Module):
    """timm's Eva cut after its first `blocks` blocks, no final norm: images [B, C, S, S] -> tokens
    [B, 1 + (S/p)^2, width] (class token first), BLIP-2's visual_encoder output."""

    def __init__(self, model: nn.Module, image_size: int, patch_size: int):
        super().__init__()
        self.model = model
        self.image_size, self.patch_size = image_size, patch_size
        self.feature_dim, self.in_channels = model.embed_dim, model.in_chans

    def forward(self, images: Tensor) -> Tensor:
        """Patch embedding + class token + position embedding, then the kept blocks (timm's own forward)."""
        return self.model.forward_features(images)


def build_eva(checkpoint: EvaCheckpoint, blocks: int, image_size: Optional[int] = None,
              dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
              gradient_checkpointing: bool = False) -> EvaEncoder:
    """The first `blocks` blocks of `checkpoint` as an EvaEncoder taking `image_size` images (default: the
    checkpoint's; another size resamples the position embeddings as LAVIS does). dtype defaults to the stored one."""
    timm = _timm()
    size = image_size or checkpoint.image_size
    if size % checkpoint.patch_size:
        raise ValueError(f"image_size={size} is not a multiple of the EVA patch size {checkpoint.patch_size}")
    dtype = dtype or next(v.dtype for v in checkpoint.state.values() if v.is_floating_point())
    try:
        # Built on the meta device: timm's random init of a 1B-parameter ViT-g takes tens of seconds on a CPU and
        # every value is overwritten by the checkpoint anyway.
        model = timm.create_model(checkpoint.architecture, pretrained=False, **checkpoint.model_args, depth=blocks,
                                  img_size=size, num_classes=0, global_pool="", use_fc_norm=False,
                                  use_post_transformer_norm=False, device="meta", dtype=dtype)
    except (RuntimeError, TypeError) as err:  # timm: "Unknown model (...)"; model_args this timm lacks
        raise ValueError(f"{checkpoint.file}: timm cannot build architecture {checkpoint.architecture!r}: "
                         f"{err}") from None
    if model.num_prefix_tokens != 1 or model.pos_embed is None:
        raise ValueError(f"{checkpoint.file}: {checkpoint.architecture} is not a class-token ViT with absolute "
                         "position embeddings (BLIP-2's EVA-g is)")
    state = _kept(checkpoint.state, blocks)
    grid = size // checkpoint.patch_size
    if state["pos_embed"].shape[1] != grid * grid + 1:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid)
    _check_state(model, state, checkpoint.file)
    materialize(model, state, device or torch.device("cpu"), checkpoint.file)
    if gradient_checkpointing:
        model.set_grad_checkpointing(True)
    return EvaEncoder(model, size, checkpoint.patch_size)


def materialize(model: nn.Module, state: dict, device: torch.device, file: Path) -> None:
    """Give the meta-device `model` real storage on `device`: the checkpoint's values, then the non-persistent
    buffers (not in any checkpoint: EVA's zero k_bias, RoPE tables) from timm's own init_non_persistent_buffers."""
    owners = [module for module in model.modules()
              if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False))]
    lacking = sorted(type(module).__name__ for module in owners if not hasattr(module, "init_non_persistent_buffers"))
    if lacking:
        raise ValueError(f"{file}: this timm cannot initialise the non-persistent buffers of {few(lacking)} after a "
                         "meta-device build; upgrade timm (pip install -U 'mrgfast[eva]')")
    model.to_empty(device=device)
    model.load_state_dict(state)
    for module in owners:
        module.init_non_persistent_buffers()


def _kept(state: dict, blocks: int) -> dict:
    """The state dict without the unused head parts and the blocks from `blocks` on."""
    kept = {}
    for key, value in state.items():
        match = BLOCK.match(key)
        if UNUSED.match(key) or (match and int(match.group(1)) >= blocks):
            continue
        kept[key] = value
    return kept


def _check_state(model: nn.Module, state: dict, file: Path) -> None:
    """ValueError naming the file and the first few missing / unexpected / wrongly shaped weights."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = key_mismatch(missing, unexpected, wrong)
    if problems:
        raise ValueError(f"{file}: does not match the EVA it describes; {problems}")


def interpolate_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + grid*grid, D]: LAVIS's interpolate_pos_embed (class token kept, the patch grid
    resized bicubically with align_corners=False, in fp32); e.g. 16x16 (224 px) -> 32x32 (448 px)."""
    extra, patches = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    side, width = math.isqrt(patches.shape[1]), patches.shape[-1]
    image = patches.reshape(1, side, side, width).permute(0, 3, 1, 2)
    image = torch.nn.functional.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([extra, image.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def _timm():
    """timm, imported on first use (only EVA towers need it)."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("loading an EVA vision tower needs timm: pip install 'mrgfast[eva]' (timm>=1.0): "
                          f"{err}") from None
    return timm
