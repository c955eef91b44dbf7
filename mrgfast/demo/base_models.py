"""The demo's base models, since none can be downloaded: a small Llama-style decoder pretrained as a language model
on synthetic report text, and a small ViT pretrained to recognise the synthetic findings. Both are cached.

`prepare_base_models(cache_dir, seed, settings)` writes, under `cache_dir/<hash of the settings>/`:
- `data/`: the synthetic datasets (mrgfast.data.synthetic.generate_demo);
- `decoder/`: an HF-style directory (Llama config.json, model.safetensors, tokenizer files) that
  `mrgfast.models.load_decoder` and `mrgfast.data.load_tokenizer` read;
- `vision/`: the ViT as `model.safetensors` + `vit_config.json` (constructor arguments and image preprocessing),
  read back by `mrgfast.models.vit_io.load_vit` (model.vision_name_or_path).
A `done.json` marker is written last, so an interrupted run is redone and a finished one is skipped.
"""

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from mrgfast.data.dataset import MedicalDataset
from mrgfast.data.images import ImageConfig, preprocess_image
from mrgfast.data.prompts import PromptBuilder
from mrgfast.data.r2gen import DEFAULT_REPORT_INSTRUCTION
from mrgfast.data.synthetic import demo_samples, generate_demo, sample_findings
from mrgfast.data.synthetic.cxr import render_frontal, render_lateral, to_uint8
from mrgfast.data.synthetic.reports import write_report
from mrgfast.data.synthetic.vqa import study_questions
from mrgfast.data.text import clean_report_iu_xray
from mrgfast.data.tokenizer import build_demo_tokenizer
from mrgfast.models.config import DecoderConfig, hf_llama_config
from mrgfast.models.decoder import Decoder
from mrgfast.models.vit import ViT
from mrgfast.models.vit_io import save_vit as save_vision

DONE = "done.json"
WEIGHTS = "model.safetensors"
TEMPLATE = "pefomed"
# What the ViT is taught to see: sided labels on the frontal view; laterals show no side (see cxr.py).
VIT_TARGETS = ("Cardiomegaly", "Left Pleural Effusion", "Right Pleural Effusion", "Left Lung Lesion",
               "Right Lung Lesion", "Pleural Effusion", "Lung Lesion")
LATERAL_TARGETS = ("Cardiomegaly", "Pleural Effusion", "Lung Lesion")
# Corpus studies are drawn from seeds far from the dataset's (seed, index) streams, so no test report is copied.
CORPUS_SEED_OFFSET = 10_000
# Part of the cache key: bump it when the pretraining code changes what it produces for the same settings.
PRETRAIN_VERSION = 3  # 2: report phrasings drawn with Zipf frequencies; 3: the train reports' writing habit


@dataclasses.dataclass(frozen=True)
class BaseModelSettings:
    """Sizes and budgets of the synthetic data and of both pretraining runs; their hash names the cache entry."""

    n_studies: int = 1000            # splits 700 / 100 / 200: val and test large enough to compare runs
    image_size: int = 128            # size the synthetic images are rendered at
    vit_input: int = 128             # size the ViT reads (ImageConfig.size); small nodules need the resolution
    vit_patch: int = 16
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    vit_corpus: int = 1500           # extra rendered studies (both views) the ViT pretrains on
    vit_steps: int = 600
    vit_batch: int = 32
    vit_lr: float = 3e-3
    group: int = 4                   # visual tokens per projector output token (PeFoMed groups 4)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1024
    corpus_reports: int = 3000       # text-only reports (with a findings hint) for the language model
    lm_steps: int = 400
    lm_batch: int = 16
    lm_lr: float = 3e-3

    def key(self, seed: int) -> str:
        """A short hash of these settings and the seed (the cache directory name)."""
        text = json.dumps(dict(dataclasses.asdict(self), seed=seed, version=PRETRAIN_VERSION), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def image_tokens(self) -> int:
        """Visual tokens per view after grouping (CLS dropped)."""
        return (self.vit_input // self.vit_patch) ** 2 // self.group


FAST_SETTINGS = BaseModelSettings(n_studies=60, image_size=64, vit_input=32, vit_patch=8, vit_dim=32, vit_depth=1,
                                  vit_heads=2, vit_corpus=8, vit_steps=4, vit_batch=8, hidden_size=32,
                                  intermediate_size=64, num_layers=1, num_heads=2, vocab_size=400, corpus_reports=50,
                                  lm_steps=4, lm_batch=8)


@dataclasses.dataclass(frozen=True)
class BaseModels:
    """Paths of a prepared cache entry and what pretraining measured."""

    root: Path
    data_dir: Path
    decoder_dir: Path
    vision_dir: Path
    settings: BaseModelSettings
    stats: dict


def demo_image_config(settings: BaseModelSettings) -> ImageConfig:
    """Grayscale images at the ViT's input size, normalised to roughly zero mean and unit spread."""
    return ImageConfig(size=settings.vit_input, mean=(0.3,), std=(0.25,), channels=1, resample="bilinear")


def prepare_base_models(cache_dir, seed: int = 0, settings: Optional[BaseModelSettings] = None,
                        log=print) -> BaseModels:
    """Generate the synthetic data and pretrain the demo decoder and ViT, or reuse the cached ones."""
    settings = settings if settings is not None else BaseModelSettings()
    if not isinstance(settings, BaseModelSettings):
        raise TypeError(f"settings must be a BaseModelSettings, got {type(settings).__name__}")
    root = Path(cache_dir) / settings.key(seed)
    paths = dict(root=root, data_dir=root / "data", decoder_dir=root / "decoder", vision_dir=root / "vision",
                 settings=settings)
    done = root / DONE
    if done.is_file():
        log(f"[demo] base models cached in {root}")
        return BaseModels(**paths, stats=json.loads(done.read_text())["stats"])
    if root.exists():  # an interrupted run: start it over rather than trust half-written files
        shutil.rmtree(root)
    torch.manual_seed(seed)
    stats = {}
    start = time.perf_counter()
    generate_demo(paths["data_dir"], seed=seed, n=settings.n_studies, size=settings.image_size, n_volumes=0)
    stats["data_s"] = time.perf_counter() - start
    log(f"[demo] synthetic data: {settings.n_studies} studies in {stats['data_s']:.1f}s -> {paths['data_dir']}")
    stats.update(pretrain_vit(paths["data_dir"], paths["vision_dir"], settings, seed, log))
    stats.update(pretrain_decoder(paths["data_dir"], paths["decoder_dir"], settings, seed, log))
    done.write_text(json.dumps({"settings": dataclasses.asdict(settings), "seed": seed, "stats": stats}, indent=1))
    return BaseModels(**paths, stats=stats)


def warmup_cosine(peak: float, step: int, steps: int, warmup: int) -> float:
    """Learning rate at `step`: linear warmup over `warmup` steps times a cosine decay to 0 over `steps`."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


# ------------------------------------------------------------------------------------------------- vision

def build_vit(settings: BaseModelSettings) -> ViT:
    """The demo ViT (grayscale input, CLS token, learnable positions)."""
    return ViT(settings.vit_input, settings.vit_patch, in_channels=1, dim=settings.vit_dim, depth=settings.vit_depth,
               heads=settings.vit_heads)


def vit_targets(labels: dict) -> tuple:
    """(frontal targets, lateral targets, lateral mask) over VIT_TARGETS from a study's labels."""
    frontal = torch.tensor([float(labels.get(name, 0) == 1) for name in VIT_TARGETS])
    mask = torch.tensor([float(name in LATERAL_TARGETS) for name in VIT_TARGETS])
    return frontal, frontal * mask, mask


def load_views(data_dir: Path, split: str, image_config: ImageConfig) -> tuple:
    """(pixels [N, 2, 1, S, S], frontal targets [N, T], lateral targets [N, T], lateral mask [T]) of a split."""
    samples = demo_samples(data_dir, "report", split)
    dataset = MedicalDataset(samples, image_config=image_config)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    targets = [vit_targets(s.labels or {}) for s in samples]
    return pixels, torch.stack([t[0] for t in targets]), torch.stack([t[1] for t in targets]), targets[0][2]


def rendered_views(count: int, seed: int, settings: BaseModelSettings, image_config: ImageConfig) -> tuple:
    """load_views' tuple for `count` freshly rendered studies (seeds apart from the dataset's): the ViT's
    pretraining corpus, as a real encoder is pretrained on far more images than the fine-tuning set has."""
    pixels, frontal, lateral = [], [], []
    for index in range(count):
        rng = np.random.default_rng([seed + CORPUS_SEED_OFFSET, 2**22, index])
        findings = sample_findings(rng)
        views = [preprocess_image(Image.fromarray(to_uint8(render(findings, rng, settings.image_size))), image_config)
                 for render in (render_frontal, render_lateral)]
        pixels.append(torch.stack(views))
        targets = vit_targets(findings.labels())
        frontal.append(targets[0])
        lateral.append(targets[1])
    mask = vit_targets({})[2]
    return torch.stack(pixels), torch.stack(frontal), torch.stack(lateral), mask


def pooled(patches: torch.Tensor) -> torch.Tensor:
    """[B, N, D] patch tokens -> [B, 2D]: their mean and their channel-wise max."""
    return torch.cat([patches.mean(1), patches.amax(1)], dim=-1)


def pretrain_vit(data_dir: Path, out_dir: Path, settings: BaseModelSettings, seed: int, log) -> dict:
    """Train the ViT (+ a linear probe on its mean patch token) to detect the findings in each view; save the ViT."""
    start = time.perf_counter()
    image_config = demo_image_config(settings)
    pixels, frontal, lateral, mask = load_views(data_dir, "train", image_config)
    if settings.vit_corpus:
        extra = rendered_views(settings.vit_corpus, seed, settings, image_config)
        pixels, frontal, lateral = (torch.cat([a, b]) for a, b in zip((pixels, frontal, lateral), extra[:3]))
    generator = torch.Generator().manual_seed(seed)
    vit = build_vit(settings)
    # The probe reads the patch tokens, not CLS (the projector sees patch tokens, so they must carry the findings):
    # their mean for diffuse findings and their channel-wise max for small ones (a nodule covers one patch).
    head = torch.nn.Linear(2 * settings.vit_dim, len(VIT_TARGETS))
    params = list(vit.parameters()) + list(head.parameters())
    optim = torch.optim.AdamW(params, lr=settings.vit_lr, weight_decay=0.01)
    images = pixels.flatten(0, 1)                                   # frontal, lateral, frontal, ...
    targets = torch.stack([frontal, lateral], 1).flatten(0, 1)
    masks = torch.stack([torch.ones_like(mask), mask]).repeat(len(pixels), 1)
    vit.train()
    warmup = max(1, settings.vit_steps // 20)
    for step in range(settings.vit_steps):
        for group in optim.param_groups:
            group["lr"] = warmup_cosine(settings.vit_lr, step, settings.vit_steps, warmup)
        index = torch.randint(len(images), (settings.vit_batch,), generator=generator)
        logits = head(pooled(vit(images[index]).patches))
        loss = (F.binary_cross_entropy_with_logits(logits, targets[index], reduction="none") * masks[index]).sum() \
            / masks[index].sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    vit.eval()
    val_pixels, val_frontal, _, _ = load_views(data_dir, "val", image_config)
    with torch.no_grad():
        predicted = head(pooled(vit(val_pixels[:, 0]).patches)) > 0
    per_target = (predicted == val_frontal.bool()).float().mean(0)
    accuracy = per_target.mean().item()
    save_vit(vit, out_dir, settings, image_config)
    seconds = time.perf_counter() - start
    log(f"[demo] ViT pretrained: {settings.vit_steps} steps in {seconds:.1f}s, final loss {loss.item():.3f}, "
        f"val frontal finding accuracy {accuracy:.3f} ("
        + ", ".join(f"{name} {value:.2f}" for name, value in zip(VIT_TARGETS, per_target.tolist())) + ")")
    return {"vit_s": seconds, "vit_loss": loss.item(), "vit_val_accuracy": accuracy,
            "vit_val_accuracy_per_finding": dict(zip(VIT_TARGETS, per_target.tolist()))}


def save_vit(vit: ViT, out_dir: Path, settings: BaseModelSettings, image_config: ImageConfig) -> None:
    """The pretrained ViT as an mrgfast ViT directory, with the demo's grouping and tokens per view."""
    args = dict(image_size=settings.vit_input, patch_size=settings.vit_patch, in_channels=1, dim=settings.vit_dim,
                depth=settings.vit_depth, heads=settings.vit_heads)
    save_vision(vit, out_dir, args, image_config, group=settings.group, image_tokens=settings.image_tokens)


# ------------------------------------------------------------------------------------------------ decoder

def corpus_reports(count: int, seed: int) -> list:
    """(findings hint, R2Gen-cleaned report) of fresh random studies (text only), the language model's corpus; the
    hint names the abnormalities ("cardiomegaly and left lung nodule", or "no abnormality")."""
    corpus = []
    for index in range(count):
        rng = np.random.default_rng([seed + CORPUS_SEED_OFFSET, index])
        findings = sample_findings(rng)
        report = clean_report_iu_xray(write_report(findings, int(rng.integers(2**31))))
        corpus.append((" and ".join(findings.abnormalities()) or "no abnormality", report))
    return corpus


def with_hint(sample, hint_ids: list, rng: np.random.Generator):
    """The sample with `hint_ids` written at a random offset inside its first image slot (the rest stays
    placeholder), so the decoder learns to read what the slots hold, wherever in them it is."""
    span = sample.spans[0]
    hint = hint_ids[:span.length]
    start = span.start + int(rng.integers(span.length - len(hint) + 1))
    ids = list(sample.input_ids)
    ids[start:start + len(hint)] = hint
    return dataclasses.replace(sample, input_ids=ids)


def tokenizer_texts(data_dir: Path, reports: list) -> list:
    """Everything the tokenizer should learn: reports, the report instruction, VQA questions and answers."""
    texts = [text for pair in reports for text in pair] + [DEFAULT_REPORT_INSTRUCTION]
    for split in ("train", "val"):
        texts += [s.answer for s in demo_samples(data_dir, "report", split)]
    for split in ("train",):
        for sample in demo_samples(data_dir, "vqa", split):
            texts += [sample.prompt, sample.answer]
    rng = np.random.default_rng(0)
    for _ in range(50):
        texts += [q + " " + a for q, a, _, _ in study_questions(sample_findings(rng))]
    return texts


def decoder_config(settings: BaseModelSettings, vocab_size: int) -> DecoderConfig:
    """The demo decoder's shape (Llama-style: SwiGLU, RMSNorm, RoPE, untied head)."""
    return DecoderConfig(vocab_size=vocab_size, hidden_size=settings.hidden_size,
                         intermediate_size=settings.intermediate_size, num_hidden_layers=settings.num_layers,
                         num_attention_heads=settings.num_heads, max_position_embeddings=1024)


def lm_batches(sequences: list, batch: int, steps: int, pad_id: int, generator: torch.Generator):
    """`steps` random right-padded batches (input_ids [B, S], targets [B, S] with -100 off the answers)."""
    for _ in range(steps):
        index = torch.randint(len(sequences), (batch,), generator=generator).tolist()
        chosen = [sequences[i] for i in index]
        width = max(len(s.input_ids) for s in chosen)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        targets = torch.full((batch, width), -100, dtype=torch.long)
        for row, sample in enumerate(chosen):
            n = len(sample.input_ids)
            ids[row, :n] = torch.tensor(sample.input_ids)
            mask = torch.tensor(sample.label_mask[1:])  # position t predicts token t+1
            targets[row, :n - 1] = torch.where(mask, ids[row, 1:n], torch.tensor(-100))
        yield ids, targets


def pretrain_decoder(data_dir: Path, out_dir: Path, settings: BaseModelSettings, seed: int, log) -> dict:
    """Build the tokenizer, pretrain the decoder on templated report text, save both as an HF directory."""
    start = time.perf_counter()
    corpus = corpus_reports(settings.corpus_reports, seed)
    tokenizer = build_demo_tokenizer(tokenizer_texts(data_dir, corpus), out_dir, vocab_size=settings.vocab_size)
    # The decoder sees the recipe's prompt layout from the start. A real pretrained LLM reads its context; this one
    # learns to by finding a text summary of the findings inside the image slots (text only: no image is seen here).
    # Fine-tuning then has to teach the projector to put what the ViT sees there, as PeFoMed does for its LLM.
    builder = PromptBuilder(tokenizer, TEMPLATE, image_tokens=[settings.image_tokens] * 2)
    rng = np.random.default_rng([seed, 3])
    sequences = [with_hint(builder.encode(DEFAULT_REPORT_INSTRUCTION, report), tokenizer.encode(hint), rng)
                 for hint, report in corpus]
    config = decoder_config(settings, tokenizer.vocab_size)
    decoder = Decoder(config)
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(decoder.parameters(), lr=settings.lm_lr, weight_decay=0.01)
    decoder.train()
    warmup = max(1, settings.lm_steps // 20)
    for step, (ids, targets) in enumerate(lm_batches(sequences, settings.lm_batch, settings.lm_steps,
                                                     tokenizer.pad_token_id, generator)):
        for group in optim.param_groups:
            group["lr"] = warmup_cosine(settings.lm_lr, step, settings.lm_steps, warmup)
        logits = decoder.compute_logits(decoder(input_ids=ids))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optim.step()
    decoder.eval()
    save_decoder(decoder, out_dir, tokenizer)
    seconds = time.perf_counter() - start
    log(f"[demo] decoder pretrained: {settings.lm_steps} steps on {len(sequences)} reports in {seconds:.1f}s, "
        f"final loss {loss.item():.3f}")
    return {"lm_s": seconds, "lm_loss": loss.item(), "lm_sequences": len(sequences)}


def save_decoder(decoder: Decoder, out_dir: Path, tokenizer) -> None:
    """config.json (Llama) + model.safetensors with HF parameter names (no buffers) beside the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous() for name, p in decoder.named_parameters()}
    save_file(weights, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_llama_config(decoder.config, tokenizer), indent=1) + "\n")
