"""mrgfast.integrations.trl on TRL's DPOTrainer with a tiny Llama + PEFT: the same losses and metrics as TRL's own
fused head for two steps, never [batch, T, vocab] logits, TRL's head back after unpatching, refusals untouched."""

import copy

import pytest
import torch
import transformers
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from trl import DPOConfig, DPOTrainer

import mrgfast
from mrgfast.data import build_demo_tokenizer
from mrgfast.integrations import trl as trl_integration
from mrgfast.integrations.instance import patched_by
from mrgfast.integrations.trl import FusedDPOTrainer, patch_dpo_trainer, unpatch_dpo_trainer
from tests.integrations.tiny import randomize_lora_b, with_lora
from tests.models.tiny_hf import llama

VOCAB = 320  # covers the tokenizer below (its 256 byte tokens, specials and a few merges)
REPORTS = ["the heart is normal in size", "no pleural effusion or pneumothorax", "small left pleural effusion",
           "the lungs are clear", "mild cardiomegaly", "no focal consolidation"]
PAIRS = {"prompt": ["report:", "findings:", "report:", "impression:"],
         "chosen": [" the heart is normal in size", " the lungs are clear", " no pleural effusion", " no focal"],
         "rejected": [" small left pleural effusion", " mild cardiomegaly", " effusion", " consolidation"]}
LORA = dict(target_modules=["q_proj", "v_proj"])
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer saved and loaded as transformers does (no download)."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_demo_tokenizer(REPORTS, path, vocab_size=300)
    return transformers.AutoTokenizer.from_pretrained(str(path))


def base_model():
    """The tiny Llama every run starts from (same weights each call)."""
    torch.manual_seed(0)
    return llama(vocab_size=VOCAB).eval()


def make_trainer(model, tokenizer, out_dir, trainer_class=DPOTrainer, peft_config=None, ref_model=None, **config):
    """A DPOTrainer over the four pairs, 2 pairs per step, fp32 (TRL's configs default to bf16 autocast)."""
    args = DPOConfig(output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     beta=0.5, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     disable_tqdm=True, seed=0, dataset_num_proc=None, **config)
    return trainer_class(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(PAIRS),
                         processing_class=tokenizer, peft_config=peft_config)


def logs(trainer) -> list:
    """What the trainer logged per step (loss and every metric), timings left out."""
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in trainer.state.log_history]


def peft_config():
    """TRL wraps the model with this LoRA itself; the reference is then the model with adapters disabled."""
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **LORA)


def patched_by_call(tokenizer, out_dir, **config):
    """TRL wraps the model with PEFT; then one call patches the trainer (log-probs and LoRA layers)."""
    return patch_dpo_trainer(make_trainer(base_model(), tokenizer, out_dir, peft_config=peft_config(), **config))


def patched_by_subclass(tokenizer, out_dir, **config):
    """A ready PeftModel, patched by mrgfast.patch first; FusedDPOTrainer (TRL adds a frozen "ref" adapter copy)."""
    model = mrgfast.patch(with_lora(base_model(), **LORA))
    return make_trainer(model, tokenizer, out_dir, trainer_class=FusedDPOTrainer, **config)


def full_fine_tuning(tokenizer, out_dir, patched=True, **config):
    """No PEFT: every weight trains (the head too) against a separate reference model."""
    trainer = make_trainer(base_model(), tokenizer, out_dir, ref_model=base_model(), **config)
    return patch_dpo_trainer(trainer) if patched else trainer


def unpatched_like(how, tokenizer, out_dir, **config):
    """TRL's own run with the same model and settings as `how` builds."""
    if how is patched_by_call:
        return make_trainer(base_model(), tokenizer, out_dir, peft_config=peft_config(), **config)
    if how is full_fine_tuning:
        return full_fine_tuning(tokenizer, out_dir, patched=False, **config)
    return make_trainer(with_lora(base_model(), **LORA), tokenizer, out_dir, **config)


@pytest.mark.parametrize("how, config", [
    (patched_by_call, {}),
    (patched_by_subclass, {}),
    (patched_by_subclass, dict(precompute_ref_log_probs=True, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])),
    (patched_by_call, dict(use_weighting=True)),
    (full_fine_tuning, {}),
], ids=["call", "subclass", "subclass-precomputed-ref-rpo", "call-wpo", "full-fine-tuning-ref-model"])
def test_patched_dpo_logs_the_same_losses_and_metrics_for_two_steps(how, config, tokenizer, tmp_path, one_thread,
                                                                    monkeypatch):
    monkeypatch.setattr(trl_integration, "CHUNK_BYTES", 4 * VOCAB * 8)  # metrics over several chunks of 8 tokens
    want = logs(unpatched_like(how, tokenizer, tmp_path / "trl", **config))
    got = logs(how(tokenizer, tmp_path / "mrgfast", **config))
    assert len(got) == len(want) == 3  # two steps, then the run's summary
    for step, (ours, theirs) in enumerate(zip(got, want)):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            # abs: rewards are beta * differences of log-probs ~50x larger, whose last bits the two kernels round apart
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (step, key)
    names = set(want[0])
    assert {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "entropy", "mean_token_accuracy"} <= names
    assert want[1]["rewards/margins"] != 0  # the second step compares a trained policy with its reference


@pytest.mark.triton
def test_patched_dpo_loss_and_lora_gradients_on_the_triton_kernels(tokenizer, tmp_path, monkeypatch, one_thread):
    """The log-prob and LoRA kernels a GPU runs (in Triton's interpreter here), on one batch."""
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    found = []
    trainers = unpatched_like(patched_by_call, tokenizer, tmp_path / "a"), patched_by_call(tokenizer, tmp_path / "b")
    for trainer in trainers:
        randomize_lora_b(trainer.model, seed=3)  # policy != reference
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        found.append((loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = found
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


class LargestVocabTensor(TorchDispatchMode):
    """The most elements of any tensor produced whose rows span the vocabulary (last dim >= vocab)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] >= self.vocab:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_a_patched_step_never_builds_batch_by_length_by_vocab_logits(tokenizer, tmp_path, one_thread):
    largest = {}
    for name, trainer in (("trl", unpatched_like(patched_by_call, tokenizer, tmp_path / "a")),
                          ("mrgfast", patched_by_call(tokenizer, tmp_path / "b"))):
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop before it calls training_step
        rows, length = inputs["input_ids"].shape
        assert rows * (length - 1) > trainer.model.config.hidden_size  # so no [hidden, vocab] matrix reaches the bound
        with LargestVocabTensor(VOCAB) as seen:
            trainer.training_step(trainer.model, inputs)
        largest[name] = seen.largest / (rows * (length - 1) * VOCAB)
    # TRL projects every position on CPU ([2B * (T-1), >= V] tiles); mrgfast only the labelled ones, in chunks.
    assert largest["trl"] >= 1 and largest["mrgfast"] < 1, largest


def test_unpatch_gives_trls_head_and_peft_layers_back(tokenizer, tmp_path):
    trainer = patched_by_call(tokenizer, tmp_path)
    policy = trainer.model.get_base_model()
    assert "mrgfast.integrations.trl" in patched_by(policy)
    unpatch_dpo_trainer(trainer)
    assert policy.forward.__func__.__code__.co_name == "_fused_forward"  # TRL's head
    assert not any(patched_by(module) for module in trainer.model.modules())
    with pytest.raises(ValueError, match="not patched"):
        unpatch_dpo_trainer(trainer)


def test_unknown_models_and_non_dpo_trainers_are_refused_untouched(tokenizer, tmp_path):
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB))
    trainer = make_trainer(mistral, tokenizer, tmp_path, peft_config=peft_config())
    with pytest.raises(TypeError, match="MistralForCausalLM"):
        patch_dpo_trainer(trainer)
    assert not any(patched_by(module) for module in trainer.model.modules())
    with pytest.raises(TypeError, match="takes a trl.DPOTrainer"):
        patch_dpo_trainer(copy.copy(object()))
    patched = patched_by_call(tokenizer, tmp_path / "twice")
    with pytest.raises(ValueError, match="already patched"):
        patch_dpo_trainer(patched)
