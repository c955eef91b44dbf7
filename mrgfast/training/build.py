"""Config -> the pieces the loop runs: tokenizer, samples, dataset, collator, resumable DataLoader, model, optimizer."""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from mrgfast.data import (DPOCollator, MedicalDataset, PackedBatchSampler, PackingCollator, PromptBuilder,
                          build_demo_tokenizer, load_tokenizer)
from mrgfast.data.images import ImageConfig
from mrgfast.data.volumes import VolumeConfig
from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import Decoder, DecoderConfig, ViT, ViT3D, load_decoder
from mrgfast.peft import apply_lora, load_adapter
from mrgfast.training.checkpoint import MANIFEST, copy_tensors_into, read_checkpoint
from mrgfast.training.config import ConfigError, TrainConfig
from mrgfast.training.optim import build_adamw
from mrgfast.training.schedule import WarmupSchedule

from mrgfast.models.feature_cache import FeatureCache, check_no_augmentation
from mrgfast.models.multimodal import MultimodalLM

TEMPLATES = {"demo": "pefomed", "pefomed": "pefomed", "mrgllm_promptwise": "mrg_llm", "mrgllm_promptbook": "mrg_llm",
             "ldp": "qwen2_vl", "rad3d_prefix": "rad3d"}
ADAPTER_SUFFIX = "adapter"      # checkpoint sub-directory holding the PEFT-format adapter
MODULES_GROUP = "modules"       # checkpoint tensor group: trainable weights other than LoRA (projector, prompts, ...)


# ------------------------------------------------------------------------------------------------------ data

def synthetic_root(config: TrainConfig) -> Path:
    """The synthetic twin's directory: data.path when it names one already generated, else one under
    data.cache_dir generated once (atomically) for these settings."""
    from mrgfast.data.synthetic import generate_demo
    data = config.data
    if data.path is not None:
        if not (Path(data.path) / "manifest.json").is_file():
            raise ConfigError(f"data.path: {data.path} holds no manifest.json; for dataset 'synthetic' it must be a "
                              "directory written by mrgfast.data.synthetic.generate_demo (or leave it unset)")
        return Path(data.path)
    root = Path(data.cache_dir) / (f"synthetic-seed{config.seed}-n{data.synthetic_n}-s{data.synthetic_size}"
                                   f"-v{data.synthetic_volumes}-{data.synthetic_volume_size}")
    if (root / "manifest.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        generate_demo(temp, seed=config.seed, n=data.synthetic_n, size=data.synthetic_size,
                      n_volumes=data.synthetic_volumes, volume_size=data.synthetic_volume_size)
        os.chmod(temp, 0o755)
        os.rename(temp, root)
    except OSError:
        if not (root / "manifest.json").is_file():  # not another process winning the race: a real failure
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return root


def read_samples(config: TrainConfig, root: Optional[Path]):
    """The run's SampleSet: the synthetic twin's part, or the real dataset at data.path."""
    from mrgfast.data import (read_ct_reports, read_preference_jsonl, read_r2gen, read_report_list, read_slake,
                              read_vqa_rad)
    from mrgfast.data.synthetic import demo_samples
    data, skip = config.data, dict(skip_bad_samples=config.data.skip_bad_samples)
    if data.clean is not None:  # else each reader's own default (TrainConfig refuses it for VQA)
        skip["clean"] = data.clean
    if data.dataset == "synthetic":
        return demo_samples(root, config.synthetic_part(), data.split, **skip)
    if data.dataset in ("iu_xray", "mimic_cxr"):
        return read_r2gen(data.path, split=data.split, dataset=data.dataset, image_dir=data.image_dir, **skip)
    if data.dataset == "vqa_rad":
        return read_vqa_rad(data.path, image_dir=data.image_dir, **skip)
    if data.dataset == "slake":
        return read_slake(data.path, image_dir=data.image_dir, **skip)
    if data.dataset == "captions":
        return read_report_list(data.path, image_dir=data.image_dir, task=data.task, **skip)
    if data.dataset == "preference":
        return read_preference_jsonl(data.path, image_dir=data.image_dir, task=data.task, **skip)
    if data.image_dir is None:
        raise ConfigError("data.image_dir: dataset 'ct_rate' needs the volume directory")
    return read_ct_reports(data.path, data.image_dir, labels_csv=data.labels_path, **skip)


def synthetic_texts(root: Path) -> list:
    """Every text of the synthetic twin's training splits (what the demo tokenizer learns from)."""
    from mrgfast.data.synthetic import demo_samples
    texts = []
    for part in ("report", "vqa", "caption", "preference", "ct"):
        try:
            samples = demo_samples(root, part, "train")
        except ValueError:  # e.g. generated without volumes
            continue
        for s in samples:
            texts.extend(t for t in (s.prompt, s.answer, s.rejected) if t)
    return texts


def build_tokenizer(config: TrainConfig, root: Optional[Path]):
    """model.tokenizer_path, else the decoder checkpoint's tokenizer, else the synthetic twin's demo tokenizer."""
    path = config.model.tokenizer_path or config.model.name_or_path
    if path is not None:
        return load_tokenizer(path)
    if root is None:
        raise ConfigError("model.tokenizer_path: real data without a decoder checkpoint needs a tokenizer directory")
    directory = root / "tokenizer"
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    temp = Path(tempfile.mkdtemp(dir=root, prefix=".tokenizer.tmp-"))
    try:
        build_demo_tokenizer(synthetic_texts(root), temp)
        os.rename(temp, directory)
    except OSError:
        if not (directory / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return load_tokenizer(directory)


class ResumableBatchSampler(torch.utils.data.Sampler):
    """PackedBatchSampler's micro-batches epoch after epoch, without end, skipping the first `consumed` (global
    count); with several ranks, rank r takes micro-batches r, r + W, r + 2W, ... of the global sequence."""

    def __init__(self, packed: PackedBatchSampler, rank: int = 0, world_size: int = 1, consumed: int = 0):
        self.packed, self.rank, self.world_size, self.consumed = packed, rank, world_size, consumed

    def __iter__(self):
        index, epoch = 0, 0
        while True:
            self.packed.set_epoch(epoch)
            batches = self.packed.batches()
            if not batches:
                raise ValueError("the dataset yields no batches: it is empty")
            for batch in batches:
                if index >= self.consumed and index % self.world_size == self.rank:
                    yield batch
                index += 1
            epoch += 1


# ----------------------------------------------------------------------------------------------------- model

@dataclass
class ModelParts:
    """The assembled model, the PromptBuilder arguments its slots need, and how to load its images/volumes."""

    model: MultimodalLM
    builder_kwargs: dict
    image_config: Optional[ImageConfig] = None
    volume_config: Optional[VolumeConfig] = None


def build_decoder(config: TrainConfig, vocab_size: int) -> Decoder:
    """The decoder: from model.name_or_path, or random with the configured sizes (M-RoPE for ldp)."""
    m = config.model
    if m.name_or_path is not None:
        dtype = torch.bfloat16 if m.dtype == "bfloat16" else None
        decoder = load_decoder(m.name_or_path, dtype=dtype)
    else:
        head_dim = m.hidden_size // m.num_attention_heads
        mrope = None
        if m.recipe == "ldp":  # Qwen2-VL's 3-axis rotary split, scaled to the tiny head
            half = head_dim // 2
            mrope = (half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8)
        decoder = Decoder(DecoderConfig(vocab_size=vocab_size, hidden_size=m.hidden_size,
                                        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                                        num_attention_heads=m.num_attention_heads,
                                        num_key_value_heads=m.num_key_value_heads, mrope_section=mrope,
                                        qkv_bias=m.recipe == "ldp"))
    if decoder.config.vocab_size < vocab_size:
        raise ConfigError(f"model.name_or_path: the decoder's vocabulary ({decoder.config.vocab_size}) is smaller "
                          f"than the tokenizer's ({vocab_size})")
    decoder.gradient_checkpointing = m.activation_checkpointing
    return decoder


def build_vision(config: TrainConfig):
    """(vision encoder, feature dim, image or volume config) for the recipe: an HF tower, or a small ViT/ViT3D."""
    m, data = config.model, config.data
    if m.vision_name_or_path is not None and m.recipe == "rad3d_prefix":
        raise ConfigError("model.vision_name_or_path: loading a pretrained 3D encoder (CT-CLIP) is not supported; "
                          "rad3d_prefix builds a ViT3D from the vision_* sizes")
    if m.vision_name_or_path is not None and (Path(m.vision_name_or_path) / "vit_config.json").is_file():
        from mrgfast.demo.base_models import load_demo_vit  # the demo's pretrained mrgfast ViT
        vit, image_config, _ = load_demo_vit(m.vision_name_or_path)
        return vit, vit.dim, image_config
    if m.vision_name_or_path is not None:
        from mrgfast.models import VisionTower
        tower = VisionTower.from_pretrained(m.vision_name_or_path, frozen=not m.train_vision,
                                            gradient_checkpointing=m.activation_checkpointing)
        return tower, tower.feature_dim, tower.image_config(data.image_size)
    size = data.image_size or (data.synthetic_volume_size if m.recipe == "rad3d_prefix" else data.synthetic_size)
    if size % m.patch_size:
        raise ConfigError(f"data.image_size: {size} must be a multiple of model.patch_size={m.patch_size}")
    if m.recipe == "rad3d_prefix":
        vision = ViT3D((size, size, size), m.patch_size, 1, m.vision_dim, m.vision_depth, m.vision_heads)
        return vision, m.vision_dim, VolumeConfig(shape=(size, size, size))
    vision = ViT(size, m.patch_size, 3, m.vision_dim, m.vision_depth, m.vision_heads, cls_token=False)
    return vision, m.vision_dim, ImageConfig(size=size)


def build_adapters(config: TrainConfig, dim: int, hidden: int) -> dict:
    """{slot kind: adapter} of the recipe (DESIGN.md's table)."""
    m = config.model
    if m.recipe == "rad3d_prefix":
        # The frozen multi-label classifier on the volume embedding (CT-RATE's 18 logits in the paper).
        classifier = nn.Linear(dim, m.n_labels)
        heads = max(h for h in (8, 4, 2, 1) if hidden % h == 0)
        return {"prefix": DiagnosticPrefix(dim, m.n_labels, hidden, m.n_prefix, m.mapper_layers, n_heads=heads,
                                           classifier=classifier)}
    if m.recipe == "ldp":  # Qwen2-VL's own 2x2 merger, frozen: LDP trains LoRA only
        if m.vision_name_or_path is not None:
            from mrgfast.models import Qwen2VLMerger
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


def build_model(config: TrainConfig, vocab_size: int, views: int) -> ModelParts:
    """The recipe's MultimodalLM: decoder (frozen, LoRA when enabled), vision encoder, adapters per slot."""
    m = config.model
    decoder = build_decoder(config, vocab_size)
    decoder.requires_grad_(False)
    if config.lora.enabled:
        apply_lora(decoder, config.lora.to_lora_config(m.name_or_path))
    vision, dim, media_config = build_vision(config)
    vision.requires_grad_(m.train_vision)
    if hasattr(vision, "set_frozen"):
        vision.set_frozen(not m.train_vision)
    model = MultimodalLM(decoder, vision=vision, adapters=build_adapters(config, dim, decoder.config.hidden_size),
                         feature_cache=build_feature_cache(config, media_config))
    if m.init_from is not None:
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
    """Start from a previous stage: a checkpoint directory (adapter + other trainables) or an adapter directory."""
    if (path / MANIFEST).is_file():
        ckpt = read_checkpoint(path)
        if (path / ADAPTER_SUFFIX).is_dir():
            load_adapter(model.decoder, path / ADAPTER_SUFFIX)
        # The previous stage's trained modules (e.g. PeFoMed's projector) by name; copy_tensors_into checks them.
        copy_tensors_into(model, ckpt.tensors.get(MODULES_GROUP, {}), str(path))
    elif (path / "adapter_config.json").is_file():
        load_adapter(model.decoder, path)
    else:
        raise ConfigError(f"model.init_from: {path} is neither a checkpoint (no {MANIFEST}) nor a PEFT adapter "
                          "directory (no adapter_config.json)")


# ---------------------------------------------------------------------------------------------- the whole run

@dataclass
class Pieces:
    """Everything train() needs, built from the config."""

    tokenizer: object
    builder: PromptBuilder
    dataset: MedicalDataset
    collator: object
    packed: PackedBatchSampler
    model: nn.Module                  # the MultimodalLM itself (FSDP2 shards it in place)
    wrapped: nn.Module                # what the step calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: WarmupSchedule


def sample_lengths(builder: PromptBuilder, sample, dpo: bool, layout: str) -> tuple:
    """(tokens the sample or pair takes in a packed row, its longest single sequence), tokenizing it once."""
    if not dpo:
        n = len(builder(sample))
        return n, n
    pair = builder.pair(sample)
    longest = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    if layout == "padded":
        return longest, longest
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids), longest


def check_max_length(samples, lengths, max_length: int) -> None:
    """ConfigError naming the first sample longer than data.max_length tokens (prompt, slots and answer)."""
    for sample, n in zip(samples, lengths):
        if n > max_length:
            raise ConfigError(f"data.max_length: sample {sample.id!r} ({sample.source or 'memory'}) has {n} tokens, "
                              f"more than max_length={max_length}; raise data.max_length (and token_budget) or "
                              "shorten the texts (the readers' max_words)")


def build_all(config: TrainConfig, device: torch.device, wrap: Optional[Callable] = None) -> Pieces:
    """Tokenizer, data, model (on `device`, then `wrap`ped for data parallelism), AdamW and schedule for `config`.

    The optimizer is built after wrapping: FSDP2 replaces the parameters with sharded ones.
    """
    if config.mode == "dpo" and config.dpo.reference == "disabled_adapters" and not config.lora.enabled:
        raise ConfigError("dpo.reference: 'disabled_adapters' needs lora.enabled=true (the reference is the model "
                          "with its adapters off); use dpo.reference=precomputed")
    root = synthetic_root(config) if config.data.dataset == "synthetic" else None
    tokenizer = build_tokenizer(config, root)
    samples = read_samples(config, root)
    if not samples:
        raise ConfigError(f"data: no samples read from {config.data.path or root} (split {config.data.split!r})")
    views = len(samples[0].image_paths)
    parts = build_model(config, tokenizer.vocab_size, views)
    model = parts.model.to(device)
    builder = PromptBuilder(tokenizer, TEMPLATES[config.model.recipe], **parts.builder_kwargs)
    dataset = MedicalDataset(samples, image_config=parts.image_config, volume_config=parts.volume_config,
                             skip_bad_samples=config.data.skip_bad_samples, seed=config.seed)
    dpo = config.mode == "dpo"
    budget, rows = config.data.token_budget, config.data.rows
    measured = [sample_lengths(builder, s, dpo, config.dpo.layout) for s in samples]
    check_max_length(samples, [longest for _, longest in measured], config.data.max_length)
    lengths = [min(packed_length, budget) for packed_length, _ in measured]
    if dpo:
        collator = DPOCollator(budget, rows, layout=config.dpo.layout, builder=builder)
    else:
        collator = PackingCollator(budget, rows, builder=builder)
    packed = PackedBatchSampler(lengths, budget, rows, seed=config.seed, shuffle=config.data.shuffle)
    wrapped = wrap(model) if wrap is not None else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters: enable lora or an adapter")
    o = config.optim
    optimizer = build_adamw(trainable, o.lr, device, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            fused=o.fused)
    s = config.schedule
    schedule = WarmupSchedule(optimizer, s.max_steps, s.resolved_warmup_steps(), s.name, s.num_cycles, s.min_lr_rate)
    return Pieces(tokenizer, builder, dataset, collator, packed, model, wrapped, optimizer, schedule)


def build_loader(pieces: Pieces, config: TrainConfig, rank: int, world_size: int, consumed: int):
    """A DataLoader over this rank's micro-batches, starting after `consumed` global micro-batches."""
    sampler = ResumableBatchSampler(pieces.packed, rank, world_size, consumed)
    return torch.utils.data.DataLoader(pieces.dataset, batch_sampler=sampler, collate_fn=pieces.collator,
                                       num_workers=config.data.num_workers)
