"""Config -> the recipe's model: decoder (+ LoRA), vision encoder, slot adapters, feature cache, starting weights."""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mrgfast.assemble.diagnostic import prefix_classifier
from mrgfast.common.names import few
from mrgfast.config import ConfigError, TrainConfig
from mrgfast.data.images import ImageConfig
from mrgfast.data.volumes import VolumeConfig
from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import (Decoder, DecoderConfig, FeatureCache, MultimodalLM, Qwen2VLMerger, ViT, ViT3D, VisionTower,
                            decoder_on_device, load_decoder)
from mrgfast.models.feature_cache import check_no_augmentation
from mrgfast.models.eva import find_eva
from mrgfast.models.vit_io import is_vit_dir, load_vit
from mrgfast.peft import apply_lora, load_adapter
from mrgfast.training.checkpoint import ADAPTER_SUFFIX, MANIFEST, MODULES_GROUP, copy_tensors_into, read_checkpoint
from mrgfast.training.minigptv2 import MODULE_NAMES, load_minigptv2, read_minigptv2

TEMPLATES = {"demo": "pefomed", "pefomed": "pefomed", "mrgllm_promptwise": "mrg_llm", "mrgllm_promptbook": "mrg_llm",
             "ldp": "qwen2_vl", "rad3d_prefix": "rad3d"}


@dataclass
class ModelParts:
    """The assembled model, the PromptBuilder arguments its slots need, and how to load its images/volumes."""

    model: MultimodalLM
    builder_kwargs: dict
    image_config: Optional[ImageConfig] = None
    volume_config: Optional[VolumeConfig] = None


def build_decoder(config: TrainConfig, vocab_size: int, device: Optional[torch.device] = None) -> Decoder:
    """The decoder: from model.name_or_path (streamed to `device`), or random with the configured sizes (M-RoPE for
    ldp), made on an accelerator `device` directly (a 7B model is never initialised in fp32 on the CPU first)."""
    m = config.model
    dtype = torch.bfloat16 if m.dtype == "bfloat16" else None
    if m.name_or_path is not None:
        decoder = load_decoder(m.name_or_path, dtype=dtype, device=device)
    else:
        head_dim = m.hidden_size // m.num_attention_heads
        mrope = None
        if m.recipe == "ldp":  # Qwen2-VL's 3-axis rotary split, scaled to the tiny head
            half = head_dim // 2
            mrope = (half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8)
        sizes = DecoderConfig(vocab_size=max(vocab_size, m.vocab_size or 0), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                              num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                              num_key_value_heads=m.num_key_value_heads, mrope_section=mrope,
                              qkv_bias=m.recipe == "ldp")
        # On the CPU as always (bit-identical runs); elsewhere allocated and initialised on the device.
        on_cpu = device is None or torch.device(device).type == "cpu"
        decoder = Decoder(sizes) if on_cpu else decoder_on_device(sizes, device, dtype)
    if decoder.config.vocab_size < vocab_size:
        raise ConfigError(f"model.name_or_path: the decoder's vocabulary ({decoder.config.vocab_size}) is smaller "
                          f"than the tokenizer's ({vocab_size})")
    decoder.gradient_checkpointing = m.activation_checkpointing
    decoder.fused_elementwise = m.fused_elementwise
    return decoder


def build_vision(config: TrainConfig):
    """(vision encoder, feature dim, image or volume config) for the recipe: an HF tower, or a small ViT/ViT3D."""
    m, data = config.model, config.data
    if m.vision_name_or_path is not None and m.recipe == "rad3d_prefix":
        raise ConfigError("model.vision_name_or_path: loading a pretrained 3D encoder (CT-CLIP) is not supported; "
                          "rad3d_prefix builds a ViT3D from the vision_* sizes")
    if m.vision_name_or_path is not None and is_vit_dir(m.vision_name_or_path):  # an mrgfast ViT (the demo's)
        vit, image_config, _ = load_vit(m.vision_name_or_path)
        return vit, vit.dim, image_config
    if m.vision_name_or_path is not None:
        # An EVA takes data.image_size (PeFoMed: 448 from the 224-px EVA-CLIP-g, position embeddings resampled);
        # the HF towers take their own size, checked by image_config below.
        eva = find_eva(m.vision_name_or_path) is not None
        tower = VisionTower.from_pretrained(m.vision_name_or_path, frozen=not m.train_vision,
                                            gradient_checkpointing=m.activation_checkpointing,
                                            select_layer=m.vision_select_layer,
                                            image_size=data.image_size if eva else None)
        return tower, tower.feature_dim, tower.image_config(data.image_size)
    size = data.image_size or (data.synthetic_volume_size if m.recipe == "rad3d_prefix" else data.synthetic_size)
    if size % m.patch_size:
        raise ConfigError(f"data.image_size: {size} must be a multiple of model.patch_size={m.patch_size}")
    if m.recipe == "rad3d_prefix":
        # Drawn from its own RNG stream (the run's seed), whatever was built before it: the classify stage and the
        # prefix run get the same frozen encoder, which the classifier's encoder_sha256 then confirms.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            vision = ViT3D((size, size, size), m.patch_size, 1, m.vision_dim, m.vision_depth, m.vision_heads)
        return vision, m.vision_dim, VolumeConfig(shape=(size, size, size))
    vision = ViT(size, m.patch_size, 3, m.vision_dim, m.vision_depth, m.vision_heads, cls_token=False)
    return vision, m.vision_dim, ImageConfig(size=size)


def build_adapters(config: TrainConfig, dim: int, hidden: int, vision: Optional[nn.Module] = None) -> dict:
    """{slot kind: adapter} of the recipe (DESIGN.md's table); RAD3D-Prefix's classifier checks `vision`."""
    m = config.model
    if m.recipe == "rad3d_prefix":
        # The frozen multi-label classifier on the volume embedding (CT-RATE's 18 logits in the paper): trained by
        # the classify stage and loaded, or random for tests (model.classifier=random). Its logits reach the mapper
        # detached (DiagnosticPrefix runs a frozen classifier under no_grad).
        classifier = prefix_classifier(config, vision, dim)
        heads = max(h for h in (8, 4, 2, 1) if hidden % h == 0)
        return {"prefix": DiagnosticPrefix(dim, m.n_labels, hidden, m.n_prefix, m.mapper_layers, n_heads=heads,
                                           classifier=classifier)}
    if m.recipe == "ldp":  # Qwen2-VL's own 2x2 merger, frozen: LDP trains LoRA only
        if m.vision_name_or_path is not None:
            merger = Qwen2VLMerger.from_pretrained(m.vision_name_or_path)
        else:
            merger = GroupedProjection(dim, hidden, 4, mode="2d")
        return {"image": merger.requires_grad_(False)}
    if m.recipe.startswith("mrgllm"):  # linear projection to visual tokens + instance-specific prompts
        return {"image": nn.Linear(dim, hidden),
                "prompt": AffinePromptGenerator(dim, hidden, m.n_prompts, book_size=m.book_size)}
    projector = GroupedProjection(dim, hidden, m.group_size)
    if projector.norm is not None:  # PeFoMed's ln_vision belongs to the frozen EVA tower
        projector.norm.requires_grad_(m.train_vision)
    return {"image": projector}


def build_model(config: TrainConfig, vocab_size: int, views: int,
                device: Optional[torch.device] = None, init_weights: bool = True) -> ModelParts:
    """The recipe's MultimodalLM: decoder (frozen, LoRA when enabled; made on `device` when given), vision encoder,
    adapters per slot, and model.init_from's weights unless `init_weights` is False (a resumed run: its checkpoint
    holds them)."""
    m = config.model
    decoder = build_decoder(config, vocab_size, device)
    decoder.requires_grad_(False)
    if config.lora.enabled:
        apply_lora(decoder, config.lora.to_lora_config(m.name_or_path))
    vision, dim, media_config = build_vision(config)
    vision.requires_grad_(m.train_vision)
    if hasattr(vision, "set_frozen"):
        vision.set_frozen(not m.train_vision)
    adapters = build_adapters(config, dim, decoder.config.hidden_size, vision)
    model = MultimodalLM(decoder, vision=vision, adapters=adapters,
                         feature_cache=build_feature_cache(config, media_config))
    if m.init_from is not None and init_weights:
        load_initial_weights(model, Path(m.init_from))
    volume = m.recipe == "rad3d_prefix"
    size = getattr(media_config, "size", None)
    kwargs = model.builder_kwargs(TEMPLATES[m.recipe], views=views, image_size=size)
    return ModelParts(model, kwargs, None if volume else media_config, media_config if volume else None)


def build_feature_cache(config: TrainConfig, media_config) -> Optional[FeatureCache]:
    """The frozen encoder's feature cache model.vision_cache asks for (None when "off")."""
    m = config.model
    if m.vision_cache == "off":
        return None
    check_no_augmentation(media_config)
    directory = None
    if m.vision_cache == "disk":
        directory = Path(m.vision_cache_dir or Path(config.output_dir) / "feature_cache")
    return FeatureCache(directory, max_bytes=int(m.vision_cache_max_gb * 2**30))


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Start from a previous stage: a checkpoint directory (adapter + other trainables), an adapter directory, or a
    MiniGPT-v2 checkpoint file (`.pth`: PeFoMed's starting projector + LoRA, mrgfast.training.minigptv2).

    A resumed run skips this (its checkpoint holds every trainable weight), so a value it would change in a frozen
    parameter is refused: a resume could not restore it."""
    if path.is_file():
        weights = read_minigptv2(path)
        with frozen_unchanged(model, MODULE_NAMES, path):  # its LoRA weights are always trained
            load_minigptv2(model, weights)
    elif (path / MANIFEST).is_file():
        ckpt = read_checkpoint(path)
        modules = ckpt.tensors.get(MODULES_GROUP, {})
        if (path / ADAPTER_SUFFIX).is_dir():
            load_adapter(model.decoder, path / ADAPTER_SUFFIX)
        # The previous stage's trained modules (e.g. PeFoMed's projector) by name; copy_tensors_into checks them.
        with frozen_unchanged(model, modules, path):
            copy_tensors_into(model, modules, str(path))
    elif (path / "adapter_config.json").is_file():
        load_adapter(model.decoder, path)
    else:
        raise ConfigError(f"model.init_from: {path} is neither a checkpoint (no {MANIFEST}), a PEFT adapter "
                          "directory (no adapter_config.json) nor a MiniGPT-v2 checkpoint file")


@contextmanager
def frozen_unchanged(model: nn.Module, names, path: Path):
    """Around loading the tensors `names` into `model`: ConfigError if a frozen parameter among them changed."""
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names if n in params and not params[n].requires_grad}
    yield
    changed = sorted(n for n, value in before.items() if not torch.equal(params[n], value))
    if changed:
        raise ConfigError(f"model.init_from: {path} sets {len(changed)} frozen weight(s) ({few(changed, 5)}) that "
                          "this run does not train, so its checkpoints would not hold them for a resume")
