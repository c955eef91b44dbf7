"""Benchmark: a PeFoMed-style training step (frozen ViT -> GroupedProjection -> LoRA decoder -> fused loss ->
backward) without and with mrgfast's FeatureCache.

Variants: no_cache runs the frozen encoder every step (under no_grad, as MultimodalLM does for a frozen tower);
cache_memory reads every image's features from the in-memory LRU (the steady state from epoch 2 on);
cache_disk reads them from safetensors files through a fresh FeatureCache each step (a new process, or images
evicted from memory). Each step hashes the images (sha256 of their bytes) to find them. Before timing, the loss
and every gradient are checked to match without and with the cache.
"""

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from mrgfast.data.packing import PackingCollator
from mrgfast.data.prompts import PromptBuilder
from mrgfast.data.tokenizer import build_demo_tokenizer
from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.models import Decoder, DecoderConfig, ViT
from mrgfast.models.feature_cache import FeatureCache
from mrgfast.models.multimodal import MultimodalLM
from mrgfast.ops.linear_cross_entropy import linear_cross_entropy
from mrgfast.peft import LoraConfig, apply_lora

NAME = "feature_cache"
# vit: (image, patch, dim, depth, heads); decoder: (hidden, intermediate, layers, heads); samples x views images.
FULL = dict(vit=(224, 14, 768, 12, 12), decoder=(1024, 2816, 4, 16), samples=4, views=2, budget=2048, rows=1,
            warmup=1, repeats=5)
QUICK = dict(vit=(64, 8, 192, 3, 3), decoder=(128, 344, 2, 4), samples=4, views=2, budget=160, rows=2,
             warmup=1, repeats=3)
TEXTS = ["the heart size is normal", "no focal consolidation pleural effusion or pneumothorax",
         "mild cardiomegaly with small left pleural effusion", "describe the findings of this chest x-ray"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # max |diff| relative to max |expected|


def build(config: dict, tokenizer, device, dtype) -> MultimodalLM:
    """The PeFoMed construction at the configured sizes: frozen ViT, trainable projector, LoRA q/v."""
    torch.manual_seed(0)
    image, patch, dim, depth, heads = config["vit"]
    hidden, inner, layers, n_heads = config["decoder"]
    decoder = Decoder(DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=inner,
                                    num_hidden_layers=layers, num_attention_heads=n_heads))
    apply_lora(decoder, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    vit = ViT(image, patch, dim=dim, depth=depth, heads=heads).requires_grad_(False)
    model = MultimodalLM(decoder, vit, {"image": GroupedProjection(dim, hidden, 4)})
    return model.to(device=device, dtype=dtype).train()


def make_batch(config: dict, model: MultimodalLM, tokenizer, device):
    """A packed batch of `samples` report samples with `views` random images each."""
    image = config["vit"][0]
    builder = PromptBuilder(tokenizer, "pefomed", **model.builder_kwargs("pefomed", views=config["views"]))
    g = torch.Generator().manual_seed(0)
    items = [{"id": str(i), "task": "report", "prompt": TEXTS[3], "answer": " ".join(TEXTS[:3]),
              "pixel_values": torch.randn(config["views"], 3, image, image, generator=g)}
             for i in range(config["samples"])]
    return PackingCollator(config["budget"], config["rows"], builder)(items).to(device)


def step(model: MultimodalLM, batch):
    """One training step's compute: forward, fused loss from the hidden states, backward."""
    hidden = model(batch)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.decoder.lm_head.weight,
                                batch.labels.flatten())
    loss.backward()
    return loss.detach()


def relative_error(got, want) -> float:
    """max |got - want| / max |want| in fp32."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def check_same(plain: MultimodalLM, cached: MultimodalLM, batch, dtype) -> float:
    """The largest relative difference of loss and gradients without vs with the cache; exits if over tolerance."""
    results = []
    for model in (plain, cached):
        model.zero_grad(set_to_none=True)
        loss = step(model, batch)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    worst = max([relative_error(loss_b, loss_a)] + [relative_error(grads_b[n], g) for n, g in grads_a.items()])
    if set(grads_a) != set(grads_b) or worst > TOLERANCE[dtype]:
        sys.exit(f"{NAME}: with the cache the step differs (relative error {worst:.3g}); not timing")
    return worst


def main() -> None:
    """Check the cached step against the plain one, then time and memory-profile the three variants."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    config, device, dtype = run.shape, run.device, run.dtype
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_demo_tokenizer(TEXTS * 4, Path(tmp) / "tokenizer", vocab_size=400)
        plain = build(config, tokenizer, device, dtype)
        batch = make_batch(config, plain, tokenizer, device)
        memory = FeatureCache(Path(tmp) / "features")
        cached = MultimodalLM(plain.decoder, plain.vision, dict(plain.adapters), feature_cache=memory)
        worst = check_same(plain, cached, batch, dtype)  # also fills the cache (memory and disk)
        on_disk = MultimodalLM(plain.decoder, plain.vision, dict(plain.adapters))

        def disk_step():
            on_disk.feature_cache = FeatureCache(Path(tmp) / "features", max_bytes=0)  # nothing kept in memory
            return step(on_disk, batch)

        images = batch.pixel_values.flatten(0, 1)

        def encoder_only():
            with torch.no_grad():
                return plain.vision(images)

        fns = {"no_cache": lambda: step(plain, batch), "cache_memory": lambda: step(cached, batch),
               "cache_disk": disk_step, "encoder_only": encoder_only}
        reset = lambda: plain.zero_grad(set_to_none=True)  # noqa: E731  (shared weights: one reset for all)
        case = harness.measure_case(fns, device, config["warmup"], config["repeats"], "no_cache", "cache_memory",
                                    reset)
        variants = case["variants"]
        base = variants["no_cache"]
        case["disk_speed_ratio"] = base["median_ms"] / variants["cache_disk"]["median_ms"]
        case["disk_memory_ratio"] = variants["cache_disk"]["peak_bytes"] / base["peak_bytes"]
        # The most a cache can save: the encoder's share of the uncached step.
        case["encoder_fraction"] = variants["encoder_only"]["median_ms"] / base["median_ms"]
        case["cache_bytes"] = memory.bytes
        case["max_relative_error"] = worst
        results = {"pefomed_step": case}
        image, patch, dim, depth, heads = config["vit"]
        run.report({
            "warmup": config["warmup"], "repeats": config["repeats"],
            "vit": dict(image=image, patch=patch, dim=dim, depth=depth, heads=heads),
            "decoder": dict(zip(("hidden", "intermediate", "layers", "heads"), config["decoder"])),
            "images_per_step": config["samples"] * config["views"], "tokens_per_step": batch.input_ids.numel(),
            "step": "MultimodalLM forward + linear_cross_entropy on lm_head + backward (LoRA q/v r=16 and the "
                    "projector trainable); cache variants hash every image each step",
            "headline": "no_cache / cache_memory time and cache_memory / no_cache peak memory; disk_* the same for "
                        "cache_disk; encoder_fraction: the frozen encoder's forward alone over the uncached step"},
            results)


if __name__ == "__main__":
    main()
