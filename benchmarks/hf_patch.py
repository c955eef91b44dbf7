"""Benchmark: mrgfast's drop-in for HF scripts, patched vs unpatched, on the trainers people already use.

Model (every variant, same weights): transformers' LlamaForCausalLM (sdpa attention) with Llama-2's 32k vocabulary,
PEFT LoRA r=64, alpha=16 on q_proj and v_proj (PeFoMed's), lora_B made non-zero so policy and reference differ.
Data: random token ids (the kernels do not care what the tokens say), the same batches for both variants.

- case "trainer_sft": transformers' `Trainer.training_step` (forward with labels, `num_items_in_batch` as its loop
  passes it, backward) + clip 1.0 + its AdamW step, LoRA dropout 0.05. Baseline "unpatched": PEFT's lora.Linear and
  transformers' `[tokens, vocab]` logits + ForCausalLMLoss. Candidate "patched": `mrgfast.patch(model)`: the fused
  LoRA op and the fused linear cross-entropy from the last hidden states (logits None). A quarter of each row is a
  prompt with labels -100. Reports tokens/s (every token of the batch).
- case "dpo_trainer": TRL's `DPOTrainer.training_step` (policy + reference forward, reference = adapters disabled,
  sigmoid loss, beta 0.1) + clip + AdamW on TRL's collated batches (chosen then rejected rows, padded). Baseline:
  TRL's own fused LM head (on CPU it projects every position; it compacts to the labelled ones only with Triton on
  CUDA). Candidate: `mrgfast.integrations.trl.patch_dpo_trainer(trainer)`: log-probs from mrgfast's fused op on the
  labelled positions, the fused LoRA op, and TRL's metric fields from one extra chunked no-grad pass of the head.
  Reports pairs/s.

Before timing, each case checks on its first batch (no dropout) that both variants compute the same loss, and for
"trainer_sft" the same LoRA gradients; any mismatch exits non-zero. On CUDA both variants run under bf16 autocast
(Trainer's bf16=True) with fp32 weights; on CPU everything is fp32.
"""

import copy
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import transformers
from peft import get_peft_model

import mrgfast
from benchmarks import harness
from benchmarks.e2e_common import LORA, LOSS_TOLERANCE, check_loss, peft_config, randomize_lora_b
from mrgfast.data import build_demo_tokenizer

NAME = "hf_patch"
FULL = dict(hidden=512, intermediate=1376, layers=4, heads=8, vocab_size=32000, rows=4, seq=512, pairs=4, prompt=128,
            completion=192, batches=2, warmup=1, repeats=6)
QUICK = dict(hidden=128, intermediate=344, layers=2, heads=4, vocab_size=8000, rows=2, seq=128, pairs=2, prompt=48,
             completion=64, batches=2, warmup=1, repeats=3)
LR = 1e-4
MAX_GRAD_NORM = 1.0
BETA = 0.1
PROMPT_SHARE = 4  # trainer_sft: the first seq / 4 positions of each row are the prompt (labels -100)


def llama(shape: dict, device: torch.device) -> transformers.LlamaForCausalLM:
    """The shared base model: fixed random weights, sdpa attention (what a user gets by default)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=shape["heads"], vocab_size=shape["vocab_size"],
                                      max_position_embeddings=4096, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).to(device)


def prepared(trainer):
    """The trainer ready for bare training_step calls, as Trainer's own loop leaves it."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def step_function(trainer, extra: dict):
    """One full step on a batch: Trainer's training_step (forward, loss, backward), clip, AdamW, zero grads."""
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step(inputs):
        loss = trainer.training_step(trainer.model, inputs, **extra)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def sft_batches(shape: dict, device: torch.device) -> list:
    """`batches` batches of [rows, seq] random ids; labels -100 on each row's prompt quarter."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(shape["batches"]):
        ids = torch.randint(0, shape["vocab_size"], (shape["rows"], shape["seq"]), generator=generator)
        labels = ids.clone()
        labels[:, :shape["seq"] // PROMPT_SHARE] = -100
        out.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return out


def sft_trainer(model, device: torch.device, out_dir: str):
    """transformers' Trainer on the PEFT model (its optimizer; the timed steps get batches directly)."""
    args = transformers.TrainingArguments(output_dir=out_dir, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM,
                                          per_device_train_batch_size=1, report_to=[], save_strategy="no",
                                          bf16=device.type == "cuda", use_cpu=device.type == "cpu")
    return prepared(transformers.Trainer(model=model, args=args, train_dataset=[{}]))


def check_sft(models: dict, batch: dict, dtype: torch.dtype) -> dict:
    """Loss and LoRA gradients of both variants on one batch, dropout off; exits non-zero on a mismatch."""
    found = {}
    for name, model in models.items():
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        found[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        model.train()
    (base_loss, base_grads), (our_loss, our_grads) = found["unpatched"], found["patched"]
    diff = check_loss(NAME, "trainer_sft loss", our_loss, base_loss, dtype)
    worst = max(((our_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in base_grads.items())
    if not worst <= LOSS_TOLERANCE[dtype] * 10:
        raise SystemExit(f"{NAME}: trainer_sft LoRA gradients differ by {worst:.2e} (relative to each one's largest)")
    return {"loss_unpatched": base_loss, "loss_patched": our_loss, "loss_relative_diff": diff,
            "lora_grad_max_relative_diff": worst}


def sft_case(shape: dict, device: torch.device, dtype: torch.dtype, out_dir: str) -> dict:
    """The Trainer + PEFT step, patched vs unpatched."""
    peft_model = get_peft_model(llama(shape, device), peft_config(LORA))
    randomize_lora_b(peft_model, seed=1)
    models = {"unpatched": peft_model, "patched": mrgfast.patch(copy.deepcopy(peft_model))}
    batches = sft_batches(shape, device)
    agreement = check_sft(models, batches[0], dtype)
    fns = {}
    for name, model in models.items():
        trainer = sft_trainer(model, device, f"{out_dir}/sft-{name}")
        step = step_function(trainer, {"num_items_in_batch": (batches[0]["labels"][:, 1:] != -100).sum()})
        fns[name] = harness.cycling(batches, step)
    result = harness.measure_case(fns, device, shape["warmup"] * len(batches), shape["repeats"],
                                  baseline="unpatched", candidate="patched")
    for variant in result["variants"].values():
        variant["tokens_per_s"] = shape["rows"] * shape["seq"] / (variant["median_ms"] / 1e3)
    return {**result, "tokens_per_s_ratio": result["speed_ratio"], "agreement": agreement}


def dpo_trainer(model, tokenizer_dir: str, device: torch.device, out_dir: str):
    """TRL's DPOTrainer wrapping the model with PEFT itself (reference = adapters disabled)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    processing = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    # TRL tokenizes its train_dataset at construction; the timed steps get the collated random pairs instead.
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    args = DPOConfig(output_dir=out_dir, beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
                     max_grad_norm=MAX_GRAD_NORM, max_length=None, per_device_train_batch_size=1, report_to=[],
                     bf16=device.type == "cuda", use_cpu=device.type == "cpu", disable_dropout=True,
                     dataset_num_proc=None, logging_steps=10 ** 9, save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=processing,
                         peft_config=peft_config(dict(LORA, lora_dropout=0.0)))
    randomize_lora_b(trainer.model, seed=1)
    return prepared(trainer)


def dpo_batches(shape: dict, trainer, device: torch.device) -> list:
    """`batches` collated batches of `pairs` random pairs (prompt, then completions of 1/2 to full length)."""
    generator = torch.Generator().manual_seed(2)

    def ids(n):
        return torch.randint(0, shape["vocab_size"], (n,), generator=generator).tolist()

    out = []
    for _ in range(shape["batches"]):
        examples = [{"prompt_ids": ids(shape["prompt"]),
                     "chosen_ids": ids(shape["completion"] // (1 + i % 2)),
                     "rejected_ids": ids(shape["completion"] // (2 - i % 2))} for i in range(shape["pairs"])]
        out.append({k: v.to(device) for k, v in trainer.data_collator(examples).items()})
    return out


def dpo_case(shape: dict, device: torch.device, dtype: torch.dtype, out_dir: str) -> dict:
    """The DPOTrainer step, patched vs unpatched."""
    from mrgfast.integrations.trl import patch_dpo_trainer
    build_demo_tokenizer(["a b c d e f g"], f"{out_dir}/tokenizer", vocab_size=300)
    base = llama(shape, device)
    trainers = {"unpatched": dpo_trainer(copy.deepcopy(base), f"{out_dir}/tokenizer", device, f"{out_dir}/dpo-a"),
                "patched": patch_dpo_trainer(dpo_trainer(base, f"{out_dir}/tokenizer", device, f"{out_dir}/dpo-b"))}
    batches = dpo_batches(shape, trainers["unpatched"], device)
    losses = {}
    with torch.no_grad():
        for name, trainer in trainers.items():
            trainer.model.train()
            with trainer.accelerator.autocast():
                losses[name] = trainer.compute_loss(trainer.model, batches[0]).item()
    diff = check_loss(NAME, "dpo_trainer first-batch loss", losses["patched"], losses["unpatched"], dtype)
    fns = {name: harness.cycling(batches, step_function(trainer, {})) for name, trainer in trainers.items()}
    result = harness.measure_case(fns, device, shape["warmup"] * len(batches), shape["repeats"],
                                  baseline="unpatched", candidate="patched")
    for variant in result["variants"].values():
        variant["pairs_per_s"] = shape["pairs"] / (variant["median_ms"] / 1e3)
    padded = batches[0]["input_ids"].shape
    return {**result, "pairs_per_s_ratio": result["speed_ratio"], "padded_batch": list(padded),
            "agreement": {"loss_unpatched": losses["unpatched"], "loss_patched": losses["patched"],
                          "loss_relative_diff": diff}}


def main() -> None:
    """Check agreement, then time and memory-profile each trainer's step patched and unpatched, alternating."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    shape, device, dtype = run.shape, run.device, run.dtype
    transformers.logging.set_verbosity_error()  # TRL's and Trainer's notices would bury the table
    with tempfile.TemporaryDirectory(prefix="mrgfast-hf-patch-") as out_dir:
        results = {"trainer_sft": sft_case(shape, device, dtype, out_dir),
                   "dpo_trainer": dpo_case(shape, device, dtype, out_dir)}
    import peft
    import trl
    run.report({**shape, "lora": LORA, "lr": LR, "max_grad_norm": MAX_GRAD_NORM, "beta": BETA,
                "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
                "autocast": "bf16 (Trainer bf16=True)" if device.type == "cuda" else "none (fp32)",
                "step": "Trainer.training_step (forward, loss, backward) + clip 1.0 + AdamW + zero grads; batches "
                        "built before timing"},
               results)


if __name__ == "__main__":
    main()
