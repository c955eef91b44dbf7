"""Cost model of the papers' claims: parameters, FLOPs/token and optimizer memory of the real configurations, plus a
measured full-fine-tuning vs LoRA step on a small model.

The real models (Llama-2-7B + EVA ViT-g as PeFoMed, Qwen2-VL-7B as LDP, Llama-3.2-1B + a prefix mapper as
RAD3D-Prefix) are built on the meta device from their configs: no weights are downloaded or allocated.

What a parameter ratio means: LDP's "833x less training compute" is 7.0B / 8.4M, a ratio of *trainable
parameters*. It sets gradient and optimizer-state memory, not compute: a LoRA step still runs the frozen model
forward and propagates activation gradients back through it, ~4N FLOPs per token against ~6N for full
fine-tuning (N = model parameters), i.e. about 1.5x less compute, not 833x.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import nn

from benchmarks import harness
from mrgfast.layers import DiagnosticPrefix
from mrgfast.peft import LoraConfig, apply_lora

NAME = "cost_model"
GIB = 1024 ** 3
# Mixed-precision AdamW per trainable parameter: bf16 weight 2 + fp32 master 4 + grad 2 + Adam m, v 8 (REFERENCE.md).
BYTES_PER_TRAINABLE = 16
BYTES_PER_FROZEN = 2  # bf16 weights only
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)
QWEN2_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064)  # M-RoPE has no parameters: left at default
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_chans=3,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# LAVIS/MiniGPT's create_eva_vit_g: width 1408, 39 blocks (EVA-CLIP-g's last block dropped), mlp 6144, 448px / 14.
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=448, patch_size=14)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2048)
FULL = dict(batch=4, seq=256, warmup=1, repeats=5, small=SMALL)
QUICK = dict(batch=2, seq=64, warmup=1, repeats=3,
             small=dict(SMALL, hidden_size=128, intermediate_size=344, num_hidden_layers=2, vocab_size=1024))


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of a module (deduplicated, so tied embeddings count once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def with_lora(model: nn.Module, **config) -> int:
    """Apply mrgfast LoRA to a frozen model in place; returns the adapter parameter count."""
    model.requires_grad_(False)
    apply_lora(model, LoraConfig(**config))
    return parameter_count(model, trainable_only=True)


def meta_llama(sizes: dict) -> nn.Module:
    """A Llama causal LM of the given sizes with every tensor on the meta device."""
    import transformers
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))


def meta_eva_vit() -> nn.Module:
    """EVA ViT-g as a CLIP vision transformer (the same block structure), on the meta device."""
    import transformers
    with torch.device("meta"):
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**EVA_VIT_G))


def meta_qwen2_vl() -> nn.Module:
    """Qwen2-VL-7B (language model and vision tower) on the meta device."""
    import transformers
    config = transformers.Qwen2VLConfig(text_config=QWEN2_VL_7B_TEXT, vision_config=QWEN2_VL_7B_VISION,
                                        **QWEN2_VL_7B_TEXT)
    with torch.device("meta"):
        return transformers.Qwen2VLForConditionalGeneration(config)


def flops_per_token(llm_params: int, layers: int, width: int, context: int, trainable: int, full: bool) -> dict:
    """Training FLOPs per token (Kaplan et al.'s 2N + 2·layers·context·width forward, backward twice that).

    Full fine-tuning: forward + activation grads + weight grads = 3x forward. PEFT with the LLM frozen:
    forward + activation grads (weight grads only for the trainable parameters: 2 FLOPs each per token).
    """
    forward = 2 * llm_params + 2 * layers * context * width
    if full:
        return {"forward": forward, "train_step": 3 * forward}
    return {"forward": forward, "train_step": 2 * forward + 2 * trainable}


def memory_model(total: int, trainable: int) -> dict:
    """Weights + gradients + AdamW state in GiB (activations excluded), full fine-tuning vs frozen + adapters."""
    return {"full_finetune_gib": total * BYTES_PER_TRAINABLE / GIB,
            "peft_gib": ((total - trainable) * BYTES_PER_FROZEN + trainable * BYTES_PER_TRAINABLE) / GIB}


def recipe_entry(name: str, llm: nn.Module, extra_frozen: int, trainable: int, context: int,
                 claim: str = "", paper_ratio=None) -> dict:
    """One recipe's parameters, ratio to full fine-tuning, FLOPs per token and memory."""
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    llm_params = parameter_count(llm)  # frozen base + adapters attached to it
    total = llm_params + extra_frozen
    layers, width = config.num_hidden_layers, config.hidden_size
    full = flops_per_token(llm_params, layers, width, context, trainable, full=True)
    peft = flops_per_token(llm_params, layers, width, context, trainable, full=False)
    return {
        "recipe": name, "total_parameters": total, "trainable_parameters": trainable,
        "trainable_percent": 100.0 * trainable / total,
        "parameter_ratio_full_over_trainable": total / trainable,
        "flops_per_token_full": full["train_step"], "flops_per_token_peft": peft["train_step"],
        "compute_ratio_full_over_peft": full["train_step"] / peft["train_step"],
        "context": context, **memory_model(total, trainable), "claim": claim, "paper_parameter_ratio": paper_ratio,
    }


def analytic_recipes() -> list[dict]:
    """The cost model of the four configurations the papers describe."""
    recipes = []

    llama = meta_llama(LLAMA2_7B)
    vit = parameter_count(meta_eva_vit())
    lora = with_lora(llama, r=64, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    projector = 4 * EVA_VIT_G["hidden_size"] * LLAMA2_7B["hidden_size"] + LLAMA2_7B["hidden_size"]
    recipes.append(recipe_entry("PeFoMed (Llama-2-7B + EVA ViT-g, LoRA q,v r=64 + projector)", llama,
                                vit + projector, lora + projector, context=512,
                                claim="paper: 33.55M LoRA + 23.08M projector = 56.63M trainable"))

    qwen = meta_qwen2_vl()
    lm_lora = with_lora(qwen.model.language_model, r=8, lora_alpha=16,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    vision = parameter_count(qwen.model.visual)
    recipes.append(recipe_entry("LDP (Qwen2-VL-7B, LoRA q,k,v,o r=8 on the LM)", qwen.model.language_model,
                                vision + parameter_count(qwen.lm_head) * (not qwen.config.tie_word_embeddings),
                                lm_lora, context=1024,
                                claim="paper: 7.0B / 8.4M trainable = 833x (a parameter ratio; LoRA settings "
                                      "unpublished, and no usual setting gives 8.4M: r=8 on q,k,v,o is ours)",
                                paper_ratio=7.0e9 / 8.4e6))

    llama1b = meta_llama(LLAMA32_1B)
    llama1b.requires_grad_(False)
    with torch.device("meta"):
        mapper = DiagnosticPrefix(512, 18, LLAMA32_1B["hidden_size"], n_prefix=10, mapper_layers=8)
    prefix = parameter_count(mapper)
    recipes.append(recipe_entry("RAD3D-Prefix (Llama-3.2-1B frozen, 8-layer prefix mapper)", llama1b, prefix,
                                prefix, context=256, claim="prefix mapper only; CT encoder and classifier frozen "
                                                           "and run once per volume (not counted)"))
    return recipes


def small_llama(sizes: dict, device: torch.device) -> nn.Module:
    """A small random Llama for the measured steps."""
    import transformers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes)).to(device)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    """One step: forward with the HF loss, backward, AdamW update."""
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    return step


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held between steps: weights plus optimizer state (gradients are set to None between steps)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return weights + state


def measured_step(shape: dict, device: torch.device) -> dict:
    """Full fine-tuning vs LoRA (q,v r=16) training steps on the same small model: time and memory."""
    full_model = small_llama(shape["small"], device)
    lora_model = small_llama(shape["small"], device)
    lora_trainable = with_lora(lora_model, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    optimizers = {"full": torch.optim.AdamW(full_model.parameters(), lr=1e-4),
                  "lora": torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-4)}
    ids = torch.randint(0, shape["small"]["vocab_size"], (shape["batch"], shape["seq"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    fns = {"full": training_step(full_model, optimizers["full"], ids),
           "lora": training_step(lora_model, optimizers["lora"], ids)}

    def reset():
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    case = harness.measure_case(fns, device, shape["warmup"], shape["repeats"], baseline="full", candidate="lora",
                                reset=reset)
    held = {"full": persistent_bytes(full_model, optimizers["full"]),
            "lora": persistent_bytes(lora_model, optimizers["lora"])}
    total = {name: held[name] + case["variants"][name]["peak_bytes"] for name in held}
    case.update(trainable_parameters={"full": parameter_count(full_model), "lora": lora_trainable},
                persistent_bytes=held, total_peak_bytes=total, total_memory_ratio=total["lora"] / total["full"])
    return case


def print_recipes(recipes: list[dict]) -> None:
    """The analytic table."""
    print(f"{'recipe':<62} {'total':>9} {'trainable':>10} {'ratio':>8} {'FLOPs ratio':>11} "
          f"{'full GiB':>9} {'PEFT GiB':>9}")
    for r in recipes:
        print(f"{r['recipe']:<62} {r['total_parameters'] / 1e9:>8.2f}B {r['trainable_parameters'] / 1e6:>9.2f}M "
              f"{r['parameter_ratio_full_over_trainable']:>7.0f}x {r['compute_ratio_full_over_peft']:>10.2f}x "
              f"{r['full_finetune_gib']:>9.1f} {r['peft_gib']:>9.1f}")
        print(f"{'':<4}{r['claim']}")


def main() -> None:
    """Analytic model of the real configurations, then the measured small-model steps."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    shape, device = run.shape, run.device
    recipes = analytic_recipes()
    print_recipes(recipes)
    results = {"small_model_step": measured_step(shape, device)}
    # The measured steps run in the default fp32 on every device, not in run.dtype.
    run.report({"dtype": "float32", "batch": shape["batch"], "seq": shape["seq"], "small_model": shape["small"],
                "bytes_per_trainable_param": BYTES_PER_TRAINABLE, "bytes_per_frozen_param": BYTES_PER_FROZEN,
                "recipes": recipes}, results)


if __name__ == "__main__":
    main()
