"""Benchmark: one multimodal SFT step end to end, mrgfast vs what a user writes today with HF transformers + PEFT.

Model (both sides, same weights): a frozen ViT -> trainable GroupedProjection (2 consecutive patches per visual
token) -> a Llama-style decoder (frozen; LoRA r=64, alpha=16, dropout 0.05 on q_proj and v_proj, PeFoMed's) with
Llama-2's 32k vocabulary. Data: the synthetic IU-Xray-like reports (two views per study) under PeFoMed's prompt.

- baseline ("hf_peft"): transformers' LlamaForCausalLM + PEFT get_peft_model, a Trainer-style loop over PADDED
  batches (right-padded to the longest sample, attention_mask), visual tokens spliced into inputs_embeds by hand
  (masked_scatter, as LLaVA-style code does), `model(inputs_embeds=, attention_mask=, labels=).loss`, backward,
  clip to 1.0, torch AdamW;
- candidate ("mrgfast"): MultimodalLM + mrgfast LoRA on PACKED fixed-budget batches (PackingCollator), the engine's
  own `mrgfast.training.steps.train_step` as `prepare` sets it up on the host: the batch cut to its widest row,
  and `loss_rows` (each document from its first supervised position on), the only rows the last decoder block's
  queries/MLP and the fused linear cross-entropy head run on; clip, AdamW.

Every step trains on the same samples on both sides (the packer's groups; the baseline pads each group), so the
supervised tokens per step are equal and the tokens/s ratio is the step-time ratio. Collation happens before timing
on both sides (a DataLoader worker's job). The losses (and the projector's gradient) of both are checked to agree
on the first batch before anything is timed; the script exits non-zero otherwise.

Ablation ("mrgfast_all_rows"): the same step without `loss_rows`, so the last block and the head run on every
position of the (trimmed) packed rows, ~90% of them unsupervised (visual tokens, prompt); it measures what the
loss rows save. CUDA-graph runs go further from this (static [rows, budget] batches, head on every slot).
"""

import copy
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from peft import get_peft_model
from torch import nn

from benchmarks import harness
from benchmarks.e2e_common import (LORA, DemoData, check_loss, copy_adapter, decoder_config, peft_config,
                                    twin_decoders)
from mrgfast.data import MedicalDataset, PackingCollator, PromptBuilder
from mrgfast.data.images import ImageConfig
from mrgfast.data.packing import IGNORE_INDEX, plan_batches
from mrgfast.data.synthetic import demo_samples
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import ViT
from mrgfast.models.multimodal import MultimodalLM
from mrgfast.training.optim import build_adamw
from mrgfast.training.steps import MicroBatch, StepSettings, prepare, sft_loss, train_step

NAME = "e2e_sft"
FULL = dict(n=200, image_size=128, patch=8, group=2, vit_dim=192, vit_depth=4, vit_heads=3, hidden=512,
            intermediate=1376, layers=4, heads=8, vocab_size=32000, budget=2048, rows=1, batches=4, warmup=1,
            repeats=6)
QUICK = dict(n=40, image_size=64, patch=8, group=2, vit_dim=64, vit_depth=1, vit_heads=2, hidden=128,
             intermediate=344, layers=2, heads=4, vocab_size=8000, budget=256, rows=2, batches=2, warmup=1,
             repeats=3)
# --scale gpu: a 0.75B decoder (hidden 2048, 12 layers of 16 heads, intermediate 5632) behind a 384-wide 6-deep ViT,
# 4 rows of 2048 tokens (8192 per step), Llama-2's 32000-token vocabulary (smaller than Llama-3's 128256: the LM
# head is measured on its own in linear_cross_entropy.py).
GPU = dict(n=400, image_size=128, patch=8, group=2, vit_dim=384, vit_depth=6, vit_heads=6, hidden=2048,
           intermediate=5632, layers=12, heads=16, vocab_size=32000, budget=2048, rows=4, batches=4, warmup=2,
           repeats=5)
LR = 1e-4
MAX_GRAD_NORM = 1.0  # Trainer's default
VIEWS = 2  # IU-Xray studies: frontal + lateral, each its own image slot
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


@dataclass
class PaddedBatch:
    """What the baseline loop feeds the model: right-padded ids, attention mask, labels (-100 off the answers)
    and the images."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        """The batch on `device`."""
        return PaddedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                                     self.pixel_values)))


def pad_batch(samples: list, pixel_values: torch.Tensor, pad_id: int) -> PaddedBatch:
    """Samples (TokenizedSample) right-padded to the longest, labels on the supervised tokens only (HF shifts them)."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        ids[row, :n] = torch.tensor(s.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(s.label_mask), ids[row, :n], IGNORE_INDEX)
    return PaddedBatch(ids, mask, labels, pixel_values)


class HFMultimodal(nn.Module):
    """The baseline model: frozen ViT -> projector, spliced by hand into a PEFT-wrapped HF Llama's inputs_embeds."""

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision, self.projector, self.llm, self.image_token_id = vision, projector, llm, image_token_id

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """The mean cross-entropy over the batch's supervised tokens, as HF computes it."""
        with torch.no_grad():  # the tower is frozen
            patches = self.vision(batch.pixel_values.flatten(0, 1)).patches
        visual = self.projector(patches)
        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        slots = (batch.input_ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
        return self.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss


@dataclass
class Setup:
    """Both models, their optimizers and the same micro-batches in each side's format."""

    mrg: MultimodalLM
    mrg_params: list
    mrg_optimizer: torch.optim.Optimizer
    mrg_batches: list          # MicroBatch on the device
    hf: HFMultimodal
    hf_params: list
    hf_optimizer: torch.optim.Optimizer
    hf_batches: list           # PaddedBatch on the device
    stats: dict


def build(shape: dict, data: DemoData, device: torch.device) -> Setup:
    """The twin models, the packer's sample groups and both formats of each group."""
    tokenizer = data.tokenizer
    decoder, hf_llm = twin_decoders(decoder_config(shape, tokenizer), tokenizer)
    peft_llm = get_peft_model(hf_llm, peft_config())
    copy_adapter(decoder, peft_llm)
    torch.manual_seed(1)
    vit = ViT(shape["image_size"], shape["patch"], 3, shape["vit_dim"], shape["vit_depth"], shape["vit_heads"],
              cls_token=False).requires_grad_(False)
    projector = GroupedProjection(shape["vit_dim"], shape["hidden"], shape["group"])
    mrg = MultimodalLM(decoder, vision=vit, adapters={"image": projector}).to(device)
    hf = HFMultimodal(vit, copy.deepcopy(projector), peft_llm, 0).to(device)
    builder = PromptBuilder(tokenizer, "pefomed", **mrg.builder_kwargs("pefomed", views=VIEWS))
    hf.image_token_id = builder.fill_ids["image"]
    samples = demo_samples(data.root, "report", "train")
    dataset = MedicalDataset(samples, image_config=ImageConfig(size=shape["image_size"]))
    tokenized = [builder(s) for s in samples]
    groups = plan_batches([len(t) for t in tokenized], shape["budget"], shape["rows"], seed=0)[:shape["batches"]]
    collator = PackingCollator(shape["budget"], shape["rows"], builder=builder)
    mrg_batches, hf_batches, supervised, real, padded = [], [], [], [], []
    for group in groups:
        items = [dataset[i] for i in group]
        packed = prepare(collator(items), device)  # attention layout built on the host, as the loader would
        n_sup = int((packed.labels != IGNORE_INDEX).sum())
        mrg_batches.append(MicroBatch(packed, torch.tensor(float(n_sup), device=device),
                                      torch.ones((), device=device)))
        pad = pad_batch([tokenized[i] for i in group], torch.stack([it["pixel_values"] for it in items]),
                        tokenizer.pad_token_id)
        hf_batches.append(pad.to(device))
        supervised.append(n_sup)
        real.append(sum(len(tokenized[i]) for i in group))
        padded.append(pad.input_ids.numel())
    mrg_params = [p for p in mrg.parameters() if p.requires_grad]
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    if sum(p.numel() for p in mrg_params) != sum(p.numel() for p in hf_params):
        raise SystemExit(f"{NAME}: trainable parameter counts differ: mrgfast {sum(p.numel() for p in mrg_params)}, "
                         f"baseline {sum(p.numel() for p in hf_params)}")
    stats = dict(samples_per_step=[len(g) for g in groups], supervised_tokens_per_step=supervised,
                 real_tokens_per_step=real, baseline_padded_slots_per_step=padded,
                 mrgfast_slots_per_step=shape["budget"] * shape["rows"],
                 visual_tokens_per_sample=VIEWS * mrg.slot_tokens("image"),
                 sample_tokens_min_max=[min(len(t) for t in tokenized), max(len(t) for t in tokenized)],
                 trainable_params=sum(p.numel() for p in mrg_params))
    return Setup(mrg, mrg_params, build_adamw(mrg_params, LR, device),
                 mrg_batches, hf, hf_params, torch.optim.AdamW(hf_params, lr=LR, fused=device.type == "cuda"),
                 hf_batches, stats)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (Trainer's bf16=True); nothing on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def all_rows(micro: MicroBatch) -> MicroBatch:
    """The micro-batch without its supervised-row index: the head runs on every position (the ablation)."""
    return replace(micro, batch=replace(micro.batch, loss_rows=None))


def check_agreement(setup: Setup, device: torch.device, dtype: torch.dtype) -> dict:
    """Loss and projector gradient of both on the first batch, dropout off; exits non-zero on a mismatch."""
    setup.mrg.eval()
    setup.hf.eval()
    with autocast(device), torch.no_grad():
        every_row = sft_loss(setup.mrg, all_rows(setup.mrg_batches[0]))
    with autocast(device):
        mrg_loss = sft_loss(setup.mrg, setup.mrg_batches[0])
        hf_loss = setup.hf(setup.hf_batches[0])
    check_loss(NAME, "first-batch loss, ablation (head on every row)", every_row.item(), mrg_loss.item(), dtype)
    mrg_loss.backward()
    hf_loss.backward()
    loss_diff = check_loss(NAME, "first-batch loss", mrg_loss.item(), hf_loss.item(), dtype)
    got, want = setup.mrg.adapters["image"].proj.weight.grad, setup.hf.projector.proj.weight.grad
    grad_diff = ((got - want).abs().max() / want.abs().max()).item()
    if not grad_diff <= GRAD_TOLERANCE[dtype]:
        raise SystemExit(f"{NAME}: projector weight gradient differs: relative error {grad_diff:.2e}")
    for p in setup.mrg_params + setup.hf_params:
        p.grad = None
    setup.mrg.train()
    setup.hf.train()
    return {"loss_mrgfast": mrg_loss.item(), "loss_baseline": hf_loss.item(), "loss_relative_diff": loss_diff,
            "projector_grad_relative_error": grad_diff}


def step_functions(setup: Setup, device: torch.device) -> dict:
    """{variant: one full training step (forward, backward, clip, AdamW, zero grads)}."""
    settings = StepSettings(mode="sft", max_grad_norm=MAX_GRAD_NORM,
                            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)

    def mrgfast_step(micro):
        return train_step(setup.mrg, setup.mrg_optimizer, [micro], settings, setup.mrg_params)

    def hf_step(batch):
        with autocast(device):
            loss = setup.hf(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.hf_params, MAX_GRAD_NORM)
        setup.hf_optimizer.step()
        setup.hf_optimizer.zero_grad(set_to_none=True)
        return loss

    # The ablation shares the mrgfast model and optimizer: it changes the weights it trains, not the cost of a step.
    return {"hf_peft": harness.cycling(setup.hf_batches, hf_step), "mrgfast": harness.cycling(setup.mrg_batches, mrgfast_step),
            "mrgfast_all_rows": harness.cycling([all_rows(m) for m in setup.mrg_batches], mrgfast_step)}


def main() -> None:
    """Check both agree on the first batch, then time and memory-profile full SFT steps, alternating."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    shape, device, dtype = run.shape, run.device, run.dtype
    data = DemoData(shape["n"], shape["image_size"])
    try:
        setup = build(shape, data, device)
    finally:
        data.close()
    agreement = check_agreement(setup, device, dtype)
    fns = step_functions(setup, device)
    # Every batch is visited equally often: each timed repeat and the memory run see the same rotation on both sides.
    result = harness.measure_case(fns, device, shape["warmup"] * len(setup.mrg_batches), shape["repeats"],
                                  baseline="hf_peft", candidate="mrgfast")
    stats = setup.stats
    mean_supervised = sum(stats["supervised_tokens_per_step"]) / len(stats["supervised_tokens_per_step"])
    mean_real = sum(stats["real_tokens_per_step"]) / len(stats["real_tokens_per_step"])
    for variant in result["variants"].values():
        variant["supervised_tokens_per_s"] = mean_supervised / (variant["median_ms"] / 1e3)
        variant["tokens_per_s"] = mean_real / (variant["median_ms"] / 1e3)
    result["tokens_per_s_ratio"] = result["speed_ratio"]
    variants = result["variants"]
    base, every_row = variants["hf_peft"], variants["mrgfast_all_rows"]
    result["ablation_all_rows_speed_ratio"] = base["median_ms"] / every_row["median_ms"]
    result["ablation_all_rows_memory_ratio"] = every_row["peak_bytes"] / base["peak_bytes"]
    run.report({**shape, "views": VIEWS, "lora": LORA, "lr": LR, "max_grad_norm": MAX_GRAD_NORM, **stats,
                "agreement": agreement,
                "throughput": "tokens_per_s counts real (non-pad) tokens of the step's samples, visual tokens "
                              "included; supervised_tokens_per_s counts answer tokens; both sides train on the same "
                              "samples per step, so either ratio equals the step-time ratio",
                "step": "forward, loss, backward, clip 1.0, AdamW, zero grads; collation done before timing"},
               {"sft_step": result})


if __name__ == "__main__":
    main()
