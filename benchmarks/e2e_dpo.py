"""Benchmark: one DPO step end to end, mrgfast vs TRL's DPOTrainer (+PEFT), reference = adapters disabled.

TEXT-ONLY on both sides: TRL's vision DPO needs an HF processor and a vision-language model class, which this
offline setup has no checkpoint for. So the image is a fixed-length block of `<ImageHere>` placeholder tokens in the
prompt (PeFoMed's prompt format), the same ids on both sides, read through the token embedding like any other
token. The decoder is Llama-style (not Qwen2-VL, LDP's model) with the same LoRA on q_proj and v_proj on both sides.

- baseline ("trl"): transformers' LlamaForCausalLM + PEFT get_peft_model, given to `trl.DPOTrainer` with
  ref_model=None (reference = the PEFT model with its adapter disabled), loss_type sigmoid, beta 0.1. The timed
  step is TRL's own `trainer.training_step` (its collated, padded batch of 2P rows: chosen then rejected; policy
  and reference forwards with TRL's chunked LM head; backward) followed by the Trainer's clip to 1.0 and its AdamW
  step, as Trainer's inner loop runs them;
- candidate ("mrgfast"): MultimodalLM (text only) + mrgfast LoRA on DPOCollator's "shared" layout (each pair
  packed as [prompt, chosen, rejected], the prompt once), the engine's `train_step` in DPO mode (fused DPO loss
  from hidden states, reference forward under disable_adapters, clip, AdamW).

On CPU, TRL's chunked LM head projects every position (it compacts to the labelled ones only when Triton runs,
i.e. on CUDA), which makes the TRL step much slower on CPU than the same code on a GPU: CPU ratios overstate the
GPU speed-up; run on a GPU for the figure that matters.

Each step trains on the same pairs on both sides (the packer's groups; TRL gets the same pairs as its batch).
Collation happens before timing on both sides. The first batch's DPO loss is checked to agree (same weights, same
beta, sigmoid loss, dropout off) before timing; the script exits non-zero otherwise.
"""

import dataclasses
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import transformers

from benchmarks import harness
from benchmarks.e2e_common import (LORA, DemoData, check_loss, copy_adapter, decoder_config, peft_config,
                                    twin_decoders)
from mrgfast.data import DPOCollator, PromptBuilder
from mrgfast.data.packing import plan_batches
from mrgfast.data.synthetic import demo_samples
from mrgfast.models.multimodal import MultimodalLM
from mrgfast.training.optim import build_adamw
from mrgfast.training.steps import MicroBatch, StepSettings, dpo_loss, prepare, train_step

NAME = "e2e_dpo"
FULL = dict(n=200, image_tokens=256, hidden=512, intermediate=1376, layers=4, heads=8, vocab_size=32000,
            budget=2048, rows=1, batches=4, warmup=1, repeats=6)
QUICK = dict(n=40, image_tokens=64, hidden=128, intermediate=344, layers=2, heads=4, vocab_size=8000,
             budget=512, rows=1, batches=2, warmup=1, repeats=3)
# --scale gpu: the same 0.75B decoder as e2e_sft's, 4 pairs of up to 2048 tokens per step, Llama-2's vocabulary.
GPU = dict(n=400, image_tokens=256, hidden=2048, intermediate=5632, layers=12, heads=16, vocab_size=32000,
           budget=2048, rows=4, batches=4, warmup=2, repeats=5)
BETA = 0.1
LR = 1e-4
MAX_GRAD_NORM = 1.0
DPO_LORA = dict(LORA, lora_dropout=0.0)  # DPOConfig.disable_dropout=True (its default) turns dropout off in TRL


def text_only(pair):
    """The pair without its image span: the placeholder ids stay in the prompt and are embedded as tokens."""
    return dataclasses.replace(pair, spans=())


def build_trainer(hf_model, tokenizer_dir: Path, device: torch.device, out_dir: str):
    """TRL's DPOTrainer on the HF model with a peft_config and ref_model=None: TRL wraps it with get_peft_model and
    its reference is that model with the adapter disabled (given a ready PeftModel, TRL would instead copy the
    adapter into a second, frozen "ref" adapter)."""
    processing = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if processing.pad_token is None:
        processing.pad_token = processing.eos_token
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    # TRL tokenizes its train_dataset at construction; the timed steps get our pre-tokenized pairs instead.
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    args = DPOConfig(output_dir=out_dir, beta=BETA, loss_type=["sigmoid"], learning_rate=LR,
                     max_grad_norm=MAX_GRAD_NORM, max_length=None, per_device_train_batch_size=1, report_to=[],
                     bf16=device.type == "cuda", use_cpu=device.type == "cpu", disable_dropout=True,
                     dataset_num_proc=None, logging_steps=10 ** 9, save_strategy="no")
    trainer = DPOTrainer(model=hf_model, ref_model=None, args=args, train_dataset=dataset,
                         processing_class=processing, peft_config=peft_config(DPO_LORA))
    trainer.create_optimizer()
    # Set by Trainer's own loop before it calls training_step; one micro-batch per optimizer step here.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@dataclasses.dataclass
class Setup:
    """Both sides' models, optimizers and the same pairs per step in each side's format."""

    mrg: MultimodalLM
    mrg_params: list
    mrg_optimizer: torch.optim.Optimizer
    mrg_batches: list           # MicroBatch on the device
    trainer: object
    trl_params: list
    trl_batches: list           # TRL's collated dicts on the device
    stats: dict


def build(shape: dict, data: DemoData, device: torch.device, out_dir: str) -> Setup:
    """Twin models, the packer's pair groups, both formats of each group."""
    tokenizer = data.tokenizer
    decoder, hf_model = twin_decoders(decoder_config(shape, tokenizer), tokenizer, lora=DPO_LORA)
    mrg = MultimodalLM(decoder).to(device)
    trainer = build_trainer(hf_model.to(device), data.root / "tokenizer", device, out_dir)
    copy_adapter(decoder, trainer.model)
    builder = PromptBuilder(tokenizer, "pefomed", image_tokens=shape["image_tokens"])
    pairs = [text_only(builder.pair(s)) for s in demo_samples(data.root, "preference", "train")]
    units = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    groups = plan_batches(units, shape["budget"], shape["rows"], seed=0)[:shape["batches"]]
    collator = DPOCollator(shape["budget"], shape["rows"], layout="shared", pad_token_id=tokenizer.pad_token_id,
                           mrope=False)
    mrg_batches, trl_batches, padded = [], [], []
    for group in groups:
        chosen = [pairs[i] for i in group]
        mrg_batches.append(MicroBatch(prepare(collator(chosen), device), torch.zeros((), device=device),
                                      torch.ones((), device=device)))
        examples = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                    for p in chosen]
        collated = trainer.data_collator(examples)
        trl_batches.append({k: v.to(device) for k, v in collated.items()})
        padded.append(collated["input_ids"].numel())
    mrg_params = [p for p in mrg.parameters() if p.requires_grad]
    trl_params = [p for p in trainer.model.parameters() if p.requires_grad]
    if sum(p.numel() for p in mrg_params) != sum(p.numel() for p in trl_params):
        raise SystemExit(f"{NAME}: trainable parameter counts differ: mrgfast {sum(p.numel() for p in mrg_params)}, "
                         f"TRL {sum(p.numel() for p in trl_params)}")
    stats = dict(pairs_per_step=[len(g) for g in groups],
                 real_tokens_per_step=[sum(len(pairs[i].prompt_ids) * 2 + len(pairs[i].chosen_ids)
                                           + len(pairs[i].rejected_ids) for i in g) for g in groups],
                 trl_padded_slots_per_step=padded, mrgfast_slots_per_step=shape["budget"] * shape["rows"],
                 pair_tokens_min_max=[min(units), max(units)], trainable_params=sum(p.numel() for p in mrg_params))
    return Setup(mrg, mrg_params, build_adamw(mrg_params, LR, device), mrg_batches, trainer, trl_params,
                 trl_batches, stats)


def settings(device: torch.device) -> StepSettings:
    """The engine's DPO step settings matching TRL's: sigmoid loss, beta, clip 1.0."""
    return StepSettings(mode="dpo", max_grad_norm=MAX_GRAD_NORM, beta=BETA, loss_type="sigmoid",
                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)


def check_agreement(setup: Setup, device: torch.device, dtype: torch.dtype) -> dict:
    """The first batch's DPO loss on both sides, no gradient; exits non-zero on a mismatch."""
    trainer = setup.trainer
    with torch.no_grad():
        mrg_loss, _ = dpo_loss(setup.mrg, setup.mrg_batches[0], settings(device))
        with trainer.accelerator.autocast():
            trl_loss = trainer.compute_loss(trainer.model, setup.trl_batches[0])
    diff = check_loss(NAME, "first-batch DPO loss", mrg_loss.item(), trl_loss.item(), dtype)
    return {"loss_mrgfast": mrg_loss.item(), "loss_trl": trl_loss.item(), "loss_relative_diff": diff}


def step_functions(setup: Setup, device: torch.device) -> dict:
    """{variant: one full DPO step (policy + reference forward, backward, clip, AdamW, zero grads)}."""
    step_settings = settings(device)
    trainer = setup.trainer

    def mrgfast_step(micro):
        return train_step(setup.mrg, setup.mrg_optimizer, [micro], step_settings, setup.mrg_params)

    def trl_step(inputs):
        loss = trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(setup.trl_params, MAX_GRAD_NORM)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    return {"trl": harness.cycling(setup.trl_batches, trl_step), "mrgfast": harness.cycling(setup.mrg_batches, mrgfast_step)}


def main() -> None:
    """Check the DPO losses agree on the first batch, then time and memory-profile full DPO steps, alternating."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL, GPU)
    shape, device, dtype = run.shape, run.device, run.dtype
    data = DemoData(shape["n"], 32)
    try:
        with tempfile.TemporaryDirectory(prefix="mrgfast-e2e-trl-") as out_dir:
            setup = build(shape, data, device, out_dir)
            setup.mrg.train()
            setup.trainer.model.train()
            agreement = check_agreement(setup, device, dtype)
            fns = step_functions(setup, device)
            # Every batch is visited equally often: each timed repeat and the memory run see the same rotation.
            result = harness.measure_case(fns, device, shape["warmup"] * len(setup.mrg_batches), shape["repeats"],
                                          baseline="trl", candidate="mrgfast")
    finally:
        data.close()
    stats = setup.stats
    mean_pairs = sum(stats["pairs_per_step"]) / len(stats["pairs_per_step"])
    for variant in result["variants"].values():
        variant["pairs_per_s"] = mean_pairs / (variant["median_ms"] / 1e3)
    result["pairs_per_s_ratio"] = result["speed_ratio"]
    import trl
    run.report({**shape, "lora": DPO_LORA, "beta": BETA, "loss_type": "sigmoid", "lr": LR,
                "max_grad_norm": MAX_GRAD_NORM, "trl": trl.__version__, **stats, "agreement": agreement,
                "modality": "text only: the image is a fixed block of <ImageHere> placeholder tokens on both sides",
                "trl_head_on_cpu": "TRL's fused LM head projects all positions on CPU (compacts to labelled ones "
                                   "only with Triton/CUDA)",
                "reference": "adapters disabled (mrgfast disable_adapters; TRL ref_model=None with a PeftModel)",
                "step": "policy + reference forward, DPO loss, backward, clip 1.0, AdamW, zero grads; collation "
                        "done before timing"},
               {"dpo_step": result})


if __name__ == "__main__":
    main()
