"""Vision towers: HF vision encoders (CLIP, SigLIP, Qwen2-VL's visual tower) and EVA ViT-g (timm's or LAVIS's
files, mrgfast.models.eva) loaded from a local directory.

Only the vision weights are read from the safetensors files (a whole CLIPModel or Qwen2-VL checkpoint is never
instantiated). The encoder modules themselves are transformers' own (they define these models), built from the
checkpoint's config and imported lazily. A tower is frozen by default: no gradients, eval mode kept even when the
parent module calls .train(), and no autograd graph (forward runs under torch.no_grad).
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from mrgfast.common.names import few
from mrgfast.data.images import ImageConfig
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models.eva import BLIP2_SELECT_LAYER, EvaEncoder, build_eva, find_eva, read_eva
from mrgfast.models.loading import checkpoint_keys

# model_type in config.json -> family. CLIPModel / SiglipModel checkpoints hold the vision model under
# `vision_model.`; a CLIPVisionModel saved by transformers < 5 also does, one saved by 5.x has no prefix.
FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
            "qwen2_vl": "qwen2_vl"}
PREFIXES = {"clip": re.compile(r"^(vision_model\.)?"), "siglip": re.compile(r"^(vision_model\.)?"),
            # transformers 5.x saves Qwen2-VL as model.visual.*, the released checkpoints use visual.*
            "qwen2_vl": re.compile(r"^(model\.)?visual\.")}
# Preprocessing defaults of the HF image processors, used when the checkpoint has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PREPROCESS = {"clip": dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample="bicubic"),
                      "siglip": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="bicubic"),
                      "qwen2_vl": dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample="bicubic")}
# Qwen2-VL takes any size that is a multiple of patch * merge; mrgfast feeds fixed square images, 448 by default
# (16 x 16 merged tokens = 256 visual tokens, as many as PeFoMed's).
QWEN2_VL_DEFAULT_SIZE = 448
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL enum values in preprocessor_config.json
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class VisionFeatures:
    """Encoder output: `features` [B, N, D] over the patch `grid` ((h, w), or (d, h, w) for volumes), row-major;
    `cls` says features[:, 0] is a CLS token ahead of the prod(grid) patch tokens; `pooled` [B, D] when the
    encoder gives one (mrgfast's ViTs)."""

    features: Tensor
    grid: tuple
    cls: bool = False
    pooled: Optional[Tensor] = None

    @property
    def patches(self) -> Tensor:
        """The patch tokens only, [B, prod(grid), D]."""
        return self.features[:, 1:] if self.cls else self.features


class VisionTower(nn.Module):
    """A frozen-by-default HF vision encoder returning VisionFeatures; build it with VisionTower.from_pretrained."""

    def __init__(self, encoder: nn.Module, family: str, select_layer: int, drop_cls: bool, post_layernorm: bool,
                 merged: bool, preprocess: dict, frozen: bool = True):
        super().__init__()
        self.encoder = encoder
        self.family, self.select_layer = family, select_layer
        self.drop_cls, self.post_layernorm, self.merged = drop_cls, post_layernorm, merged
        self.preprocess = dict(preprocess)
        config = getattr(encoder, "config", None)
        if family == "eva":
            self.patch_size, self.in_channels = encoder.patch_size, encoder.in_channels
            self.feature_dim, self.image_size = encoder.feature_dim, encoder.image_size
        elif family == "qwen2_vl":
            self.patch_size, self.merge_size = config.patch_size, config.spatial_merge_size
            self.temporal_patch_size, self.in_channels = config.temporal_patch_size, config.in_channels
            self.feature_dim = config.hidden_size if merged else config.embed_dim
            self.image_size = None  # any multiple of patch_size * merge_size
        else:
            self.patch_size, self.in_channels = config.patch_size, config.num_channels
            self.feature_dim, self.image_size = config.hidden_size, config.image_size
        self.set_frozen(frozen)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None, frozen: bool = True,
                        select_layer: Optional[int] = None, drop_cls: bool = True, post_layernorm: bool = False,
                        merged: bool = False, gradient_checkpointing: bool = False,
                        image_size: Optional[int] = None) -> "VisionTower":
        """The vision encoder of the HF directory `path` (CLIP / SigLIP, whole or vision-only, or Qwen2-VL), or an
        EVA ViT (a timm save_for_hf directory, or LAVIS's eva_vit_g.pth / a directory holding it).

        select_layer: which hidden state to return, as HF's hidden_states[select_layer] (0 = embeddings, -1 = last
        layer, -2 = LLaVA's choice); layers after it are neither built nor loaded. None: -1, except EVA's -2
        (BLIP-2's convention: the 40-block EVA-g's block 39 output, no final norm; mrgfast.models.eva).
        drop_cls: drop CLIP's / EVA's CLS token, as MiniGPT-v2 does (models without one return patch tokens either
        way). image_size (EVA only): the input size, default the checkpoint's; another one (PeFoMed: 448 from the
        224-px EVA-CLIP-g) resamples the position embeddings as LAVIS does. post_layernorm: apply the checkpoint's
        final LayerNorm to every token (SigLIP's last_hidden_state is select_layer=-1 with it; CLIP applies it to CLS
        only).
        merged (Qwen2-VL): return the tokens after Qwen2-VL's own 2x2 merger instead of the patch features.
        gradient_checkpointing: recompute each layer in backward (for an unfrozen tower being trained).
        dtype defaults to the stored one, device to CPU.
        """
        path = Path(path)
        if find_eva(path) is not None:
            return cls._from_eva(path, dtype, device, frozen, select_layer, drop_cls, post_layernorm, merged,
                                 gradient_checkpointing, image_size)
        if image_size is not None:
            raise ValueError(f"image_size={image_size}: only EVA towers take another input size; CLIP / SigLIP take "
                             "their checkpoint's, Qwen2-VL's is chosen by image_config(size)")
        select_layer = -1 if select_layer is None else select_layer
        transformers = _transformers()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found: VisionTower needs a Hugging Face model "
                                    "directory")
        config = transformers.AutoConfig.from_pretrained(path)
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise ValueError(f"{path / 'config.json'}: model_type {config.model_type!r} is not a supported vision "
                             f"tower; supported: {sorted(FAMILIES)}")
        vision_config = getattr(config, "vision_config", None) or config
        layers_name = "depth" if family == "qwen2_vl" else "num_hidden_layers"
        keep = _layers_to_keep(select_layer, getattr(vision_config, layers_name))
        _check_options(family, select_layer, post_layernorm, merged)
        setattr(vision_config, layers_name, keep)  # later layers are neither built nor loaded
        keys = checkpoint_keys(path)
        names = _vision_names(keys, PREFIXES[family])
        dtype = dtype or _stored_dtype(path, keys, names)
        device = torch.device(device) if device is not None else torch.device("cpu")
        encoder = _build_encoder(family, vision_config, dtype, device, post_layernorm, merged)
        load_weights(encoder, path, keys, names, device)
        if gradient_checkpointing:
            enable_hf_checkpointing(encoder)
        preprocess = read_preprocess(path, family)
        return cls(encoder, family, select_layer, drop_cls, post_layernorm, merged, preprocess, frozen=frozen).eval()

    @classmethod
    def _from_eva(cls, path: Path, dtype, device, frozen, select_layer, drop_cls, post_layernorm, merged,
                  gradient_checkpointing, image_size) -> "VisionTower":
        """An EVA tower from timm's or LAVIS's files (from_pretrained's arguments)."""
        select_layer = BLIP2_SELECT_LAYER if select_layer is None else select_layer
        _check_options("eva", select_layer, post_layernorm, merged)
        checkpoint = read_eva(path)
        keep = _layers_to_keep(select_layer, checkpoint.depth)
        device = torch.device(device) if device is not None else torch.device("cpu")
        encoder = build_eva(checkpoint, keep, image_size, dtype, device, gradient_checkpointing)
        return cls(encoder, "eva", select_layer, drop_cls, False, False, checkpoint.preprocess, frozen=frozen).eval()

    def set_frozen(self, frozen: bool) -> "VisionTower":
        """Freeze (no grads, eval mode, no graph) or unfreeze the encoder; returns self."""
        self.frozen = bool(frozen)
        self.encoder.requires_grad_(not self.frozen)
        if self.frozen:
            self.encoder.eval()
        return self

    def train(self, mode: bool = True) -> "VisionTower":
        """nn.Module.train, except a frozen encoder stays in eval mode (dropout off, as it was trained)."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, pixel_values: Tensor, grid_thw: Optional[Tensor] = None) -> VisionFeatures:
        """Images [B, C, H, W] (or, for Qwen2-VL, the HF processor's flattened patches with `grid_thw` [B, 3])
        -> VisionFeatures [B, N, D] with the patch grid (h, w)."""
        if self.frozen:
            with torch.no_grad():
                return self._encode(pixel_values, grid_thw)
        return self._encode(pixel_values, grid_thw)

    def _encode(self, pixel_values: Tensor, grid_thw: Optional[Tensor]) -> VisionFeatures:
        """The forward pass, with or without autograd."""
        if self.family == "qwen2_vl":
            return self._encode_qwen2_vl(pixel_values, grid_thw)
        if grid_thw is not None:
            raise ValueError(f"grid_thw is only used by Qwen2-VL towers, this one is {self.family}")
        self._check_images(pixel_values)
        encoder = self.encoder
        if isinstance(encoder, EvaEncoder):
            hidden = encoder(pixel_values.to(encoder.model.patch_embed.proj.weight.dtype))
            side = self.image_size // self.patch_size
            return VisionFeatures(hidden[:, 1:] if self.drop_cls else hidden, (side, side), cls=not self.drop_cls)
        hidden = encoder.embeddings(pixel_values.to(encoder.embeddings.patch_embedding.weight.dtype))
        if self.family == "clip":
            hidden = encoder.pre_layrnorm(hidden)
        hidden = encoder.encoder(inputs_embeds=hidden).last_hidden_state
        if self.post_layernorm:
            hidden = encoder.post_layernorm(hidden)
        side = self.image_size // self.patch_size
        has_cls = self.family == "clip"
        if has_cls and self.drop_cls:
            hidden = hidden[:, 1:]
        return VisionFeatures(hidden, (side, side), cls=has_cls and not self.drop_cls)

    def _check_images(self, images: Tensor) -> None:
        """ValueError unless images are [B, in_channels, image_size, image_size]."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"pixel_values must be [batch, {self.in_channels}, height, width], got shape "
                             f"{tuple(images.shape)}")
        height, width = images.shape[2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"pixel_values {height}x{width} is not divisible by the patch size {self.patch_size}")
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be {self.image_size}x{self.image_size} (the checkpoint's "
                             f"image_size), got {height}x{width}")

    def _encode_qwen2_vl(self, pixel_values: Tensor, grid_thw: Optional[Tensor]) -> VisionFeatures:
        """Qwen2-VL: patches in the HF processor's 2x2-block order in, row-major features (or merged tokens) out."""
        if pixel_values.dim() == 4:
            if pixel_values.shape[1] != self.in_channels:
                raise ValueError(f"pixel_values must be [batch, {self.in_channels}, height, width], got shape "
                                 f"{tuple(pixel_values.shape)}")
            if grid_thw is not None:
                raise ValueError("grid_thw is given by the patch layout of image pixel_values [B, C, H, W]; pass it "
                                 "only with flattened patches [patches, C * t * p * p]")
            patches, grid_thw = qwen2_vl_patchify(pixel_values, self.patch_size, self.temporal_patch_size,
                                                  self.merge_size)
        elif pixel_values.dim() == 2 and grid_thw is not None:
            patches, grid_thw = pixel_values, torch.as_tensor(grid_thw)
        else:
            raise ValueError(f"pixel_values must be images [B, C, H, W], or flattened patches [patches, dim] with "
                             f"grid_thw [B, 3]; got shape {tuple(pixel_values.shape)}, grid_thw "
                             f"{'given' if grid_thw is not None else 'None'}")
        batch, height, width = self._check_grid(patches, grid_thw)
        weight = self.encoder.patch_embed.proj.weight
        out = self.encoder(patches.to(weight.dtype), grid_thw=grid_thw.to(weight.device))
        if self.merged:
            m = self.merge_size
            return VisionFeatures(out.pooler_output.reshape(batch, height * width // m ** 2, -1),
                                  (height // m, width // m))
        return VisionFeatures(blocks_to_rows(out.last_hidden_state, batch, height, width, self.merge_size),
                              (height, width))

    def _check_grid(self, patches: Tensor, grid_thw: Tensor) -> tuple[int, int, int]:
        """(batch, h, w) of a batch of single-frame images that all share one grid; ValueError otherwise."""
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or len(grid_thw) == 0:
            raise ValueError(f"grid_thw must be [images, 3] rows of (t, h, w), got shape {tuple(grid_thw.shape)}")
        rows = {tuple(row) for row in grid_thw.tolist()}
        if len(rows) != 1:
            raise ValueError(f"every image in a batch must have the same patch grid (resize them to one size); got "
                             f"grid_thw rows {sorted(rows)}")
        t, height, width = rows.pop()
        if t != 1:
            raise ValueError(f"grid_thw t={t}: only single images (t=1) are supported, not videos")
        m = self.merge_size
        if height % m or width % m:
            raise ValueError(f"grid_thw h={height}, w={width} must be divisible by the merge size {m}")
        width_expected = self.in_channels * self.temporal_patch_size * self.patch_size ** 2
        if patches.shape != (len(grid_thw) * height * width, width_expected):
            raise ValueError(f"flattened pixel_values must be [{len(grid_thw) * height * width}, {width_expected}] "
                             f"for grid_thw {grid_thw.tolist()}, got {tuple(patches.shape)}")
        return len(grid_thw), height, width

    def image_config(self, size: Optional[int] = None, **overrides) -> ImageConfig:
        """The mrgfast.data.ImageConfig this tower expects (size, mean, std, resample from the checkpoint's
        preprocessor_config.json, else the HF processor defaults); `overrides` (e.g. augment=True) pass through.

        CLIP / SigLIP: size is the checkpoint's image_size (another size raises ValueError). Qwen2-VL: `size`
        (default 448) must be a multiple of patch_size * merge_size within the processor's min/max pixels.
        """
        if self.family != "qwen2_vl":
            if size is not None and size != self.image_size:
                raise ValueError(f"size={size}: this {self.family} tower takes {self.image_size}x{self.image_size} "
                                 "images only")
            size = self.image_size
        else:
            size = QWEN2_VL_DEFAULT_SIZE if size is None else size
            factor = self.patch_size * self.merge_size
            if size % factor:
                raise ValueError(f"size={size}: Qwen2-VL images must be a multiple of patch_size * merge_size = "
                                 f"{factor}")
            low, high = self.preprocess.get("min_pixels"), self.preprocess.get("max_pixels")
            if (low is not None and size * size < low) or (high is not None and size * size > high):
                raise ValueError(f"size={size}: {size}x{size} pixels is outside the checkpoint's "
                                 f"[min_pixels={low}, max_pixels={high}]")
        fields = dict(size=size, mean=tuple(self.preprocess["mean"]), std=tuple(self.preprocess["std"]),
                      channels=self.in_channels, resample=self.preprocess["resample"])
        fields.update(overrides)
        return ImageConfig(**fields)

    def extra_repr(self) -> str:
        """Tower settings shown by print(module)."""
        return (f"family={self.family!r}, select_layer={self.select_layer}, drop_cls={self.drop_cls}, "
                f"post_layernorm={self.post_layernorm}, merged={self.merged}, frozen={self.frozen}")


class Qwen2VLMerger(nn.Module):
    """Qwen2-VL's patch merger as an adapter on row-major VisionFeatures: LayerNorm -> 2x2 grouping -> Linear
    (one fused GroupedProjection), then GELU -> Linear; equal to HF's PatchMerger on HF's block order."""

    def __init__(self, dim: int, out_dim: int, merge_size: int = 2, device=None, dtype=None):
        super().__init__()
        group = merge_size ** 2
        self.merge_size = merge_size
        self.group = GroupedProjection(dim, group * dim, group, mode="2d", eps=1e-6, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.out = nn.Linear(group * dim, out_dim, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None) -> "Qwen2VLMerger":
        """The merger weights of a Qwen2-VL directory (trainable: the caller freezes it when it should be)."""
        path = Path(path)
        config = _transformers().AutoConfig.from_pretrained(path)
        if config.model_type != "qwen2_vl":
            raise ValueError(f"{path / 'config.json'}: Qwen2VLMerger needs a qwen2_vl checkpoint, got model_type "
                             f"{config.model_type!r}")
        vision = config.vision_config
        keys = checkpoint_keys(path)
        names = _vision_names(keys, PREFIXES["qwen2_vl"])
        renamed = {"group.norm.weight": "merger.ln_q.weight", "group.norm.bias": "merger.ln_q.bias",
                   "group.proj.weight": "merger.mlp.0.weight", "group.proj.bias": "merger.mlp.0.bias",
                   "out.weight": "merger.mlp.2.weight", "out.bias": "merger.mlp.2.bias"}
        names = {ours: names[theirs] for ours, theirs in renamed.items() if theirs in names}
        dtype = dtype or _stored_dtype(path, keys, names)
        device = torch.device(device) if device is not None else torch.device("cpu")
        merger = cls(vision.embed_dim, vision.hidden_size, vision.spatial_merge_size, device=device, dtype=dtype)
        load_weights(merger, path, keys, names, device)
        return merger

    def forward(self, features: VisionFeatures) -> VisionFeatures:
        """Row-major patch features [B, h*w, dim] on grid (h, w) -> merged tokens [B, h*w/4, out_dim]."""
        if features.cls:
            raise ValueError("Qwen2VLMerger takes patch tokens only; got features with a CLS token")
        height, width = features.grid
        merged = self.out(self.act(self.group(features.features, grid=(height, width))))
        return VisionFeatures(merged, (height // self.merge_size, width // self.merge_size))


def enable_hf_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on a transformers model, under either name transformers has used.

    `activation_checkpointing_enable` is the newer 5.x name (the old one warns that it goes in v6); 5.17, the H200
    image's, has only `gradient_checkpointing_enable`.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def qwen2_vl_patchify(images: Tensor, patch_size: int, temporal_patch_size: int,
                      merge_size: int) -> tuple[Tensor, Tensor]:
    """Normalised images [B, C, H, W] -> (patches [B * h * w, C * t * p * p], grid_thw [B, 3]) laid out exactly as
    Qwen2-VL's image processor lays them out: each frame repeated t times, patches in 2x2-block order."""
    batch, channels, height, width = images.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"pixel_values {height}x{width} is not divisible by patch_size * merge_size = {factor}")
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    frames = images.unsqueeze(1).expand(batch, temporal_patch_size, channels, height, width)
    blocks = frames.reshape(batch, temporal_patch_size, channels, gh // m, m, p, gw // m, m, p)
    patches = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(batch * gh * gw, -1)
    grid_thw = torch.tensor([[1, gh, gw]] * batch, device=images.device)
    return patches, grid_thw


def blocks_to_rows(tokens: Tensor, batch: int, height: int, width: int, merge_size: int) -> Tensor:
    """Qwen2-VL tokens [B * h * w, D] in 2x2-block order -> [B, h * w, D] in row-major grid order."""
    m = merge_size
    blocks = tokens.reshape(batch, height // m, width // m, m, m, tokens.shape[-1])
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * width, tokens.shape[-1])


def read_preprocess(path: Path, family: str) -> dict:
    """mean, std, resample (and Qwen2-VL's min/max pixels) from preprocessor_config.json, else HF's defaults."""
    preprocess = dict(DEFAULT_PREPROCESS[family])
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return preprocess
    try:
        saved = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if theirs in saved:
            values = saved[theirs]
            if not isinstance(values, list) or len(values) != 3:
                raise ValueError(f"{file}: {theirs!r} must be a list of 3 numbers, got {values!r}")
            preprocess[ours] = tuple(float(v) for v in values)
    if "resample" in saved:
        if saved["resample"] not in PIL_RESAMPLE:
            raise ValueError(f"{file}: resample={saved['resample']!r} is not one mrgfast.data supports "
                             f"({PIL_RESAMPLE})")
        preprocess["resample"] = PIL_RESAMPLE[saved["resample"]]
    size = saved.get("size") if isinstance(saved.get("size"), dict) else {}
    for ours, keys in (("min_pixels", ("min_pixels", "shortest_edge")), ("max_pixels", ("max_pixels", "longest_edge"))):
        found = [saved.get(keys[0]), size.get(keys[0]), size.get(keys[1])]
        if family == "qwen2_vl" and any(v is not None for v in found):
            preprocess[ours] = next(v for v in found if v is not None)
    return preprocess


def load_weights(module: nn.Module, path: Path, keys: dict, names: dict, device: torch.device) -> None:
    """Copy checkpoint tensors into `module`'s parameters/buffers in place; `names` maps module names to
    checkpoint keys. ValueError naming missing weights or wrong shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} vision weight(s): {few(missing)}")
    by_file = {}
    for name in expected:
        by_file.setdefault(keys[names[name]], []).append(name)
    with torch.no_grad():
        for file, entries in by_file.items():
            with safe_open(path / file, framework="pt", device=str(device)) as f:
                for name in entries:
                    tensor = f.get_tensor(names[name])
                    if tensor.shape != expected[name].shape:
                        raise ValueError(f"{path / file}: {names[name]!r} has shape {tuple(tensor.shape)}, but the "
                                         f"config implies {tuple(expected[name].shape)}")
                    expected[name].copy_(tensor)


def _vision_names(keys: dict, prefix: re.Pattern) -> dict:
    """Encoder-module name -> checkpoint key, for every key under the vision prefix."""
    names = {}
    for key in keys:
        match = prefix.match(key)
        if match:
            names[key[match.end():]] = key
    return names


def _stored_dtype(path: Path, keys: dict, names: dict) -> torch.dtype:
    """The dtype the vision weights are stored in (read from one tensor's header)."""
    if not names:
        raise ValueError(f"{path}: the checkpoint holds no vision weights")
    key = next(iter(names.values()))
    with safe_open(path / keys[key], framework="pt") as f:
        stored = f.get_slice(key).get_dtype()
    return STORED_DTYPES.get(stored, torch.float32)


def _layers_to_keep(select_layer: int, layers: int) -> int:
    """How many encoder layers hidden_states[select_layer] needs (hidden_states has layers + 1 entries)."""
    valid = isinstance(select_layer, int) and not isinstance(select_layer, bool)
    if not valid or not -(layers + 1) <= select_layer <= layers:
        raise ValueError(f"select_layer must be an int in [{-(layers + 1)}, {layers}] for a {layers}-layer encoder, "
                         f"got {select_layer!r}")
    return select_layer if select_layer >= 0 else layers + 1 + select_layer


def _check_options(family: str, select_layer: int, post_layernorm: bool, merged: bool) -> None:
    """ValueError for options the family does not have."""
    if merged and family != "qwen2_vl":
        raise ValueError(f"merged=True applies Qwen2-VL's merger; a {family} tower has none")
    if merged and select_layer != -1:
        raise ValueError(f"merged=True is Qwen2-VL's own output (merger after the last layer); got "
                         f"select_layer={select_layer}")
    if post_layernorm and family == "qwen2_vl":
        raise ValueError("post_layernorm=True: Qwen2-VL's tower has no final LayerNorm (its merger has one)")
    if post_layernorm and family == "eva":
        raise ValueError("post_layernorm=True: BLIP-2's EVA tower ends without a final norm (its ln_vision is the "
                         "projector's LayerNorm)")


def _build_encoder(family: str, vision_config, dtype: torch.dtype, device: torch.device, post_layernorm: bool,
                   merged: bool) -> nn.Module:
    """The family's transformers vision module with uninitialised weights on `device` (filled from disk next)."""
    transformers = _transformers()
    from transformers.initialization import no_init_weights
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
        module_class = Qwen2VisionTransformerPretrainedModel
    else:
        module_class = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[family]
    if family == "siglip":
        vision_config.vision_use_head = False  # the attention-pooling head is not part of the features
    with torch.device(device), no_init_weights():
        encoder = module_class._from_config(vision_config, dtype=dtype, attn_implementation="sdpa")
    # Unused parts are dropped (not loaded): a trainable tower would otherwise hold parameters that never get a
    # gradient, which DistributedDataParallel rejects. Qwen2VLMerger loads the merger as a separate adapter.
    if family != "qwen2_vl" and not post_layernorm:
        encoder.post_layernorm = nn.Identity()
    if family == "qwen2_vl" and not merged:
        encoder.merger = nn.Identity()
    return encoder


def _transformers():
    """transformers, imported on first use (it defines these encoders; mrgfast's decoder does not need it)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("VisionTower needs transformers >= 5 (pip install 'transformers>=5') to build HF vision "
                          f"encoders: {err}") from None
    # 5.x flattened CLIPVisionModel / SiglipVisionModel (no inner .vision_model) and added no_init_weights here.
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"VisionTower needs transformers >= 5, found {transformers.__version__}")
    return transformers
