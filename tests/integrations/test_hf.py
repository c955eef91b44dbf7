"""mrgfast.patch / unpatch on tiny transformers (+ PEFT) models: same loss and gradients as unpatched, through HF's
Trainer too, PEFT's bookkeeping untouched, bit-identical after unpatch, unknown models refused untouched."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel

import mrgfast
from mrgfast.integrations import norms
from mrgfast.integrations.instance import SAVED
from tests.integrations.tiny import BUILDERS, batch, build, with_lora

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32


def loss_and_grads(model, inputs: dict):
    """The loss (fp32) and the gradient of every trainable parameter by name, from fresh gradients."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def forwards(model) -> list:
    """The modules whose forward is replaced on the instance (none after unpatch)."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__ or SAVED in module.__dict__]


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_patched_loss_and_every_trainable_gradient_match_unpatched(arch, peft, one_thread):
    model = build(arch)
    model = with_lora(model) if peft else model
    inputs = batch(arch)
    want_loss, want_grads = loss_and_grads(model, inputs)
    assert mrgfast.patch(model) is model
    out = model(**inputs)
    assert out.logits is None  # Liger's convention: no [tokens, vocab] logits with labels
    got_loss, got_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patched_model_on_the_triton_kernels_matches_unpatched(arch, monkeypatch, one_thread):
    """The kernels a GPU runs (in Triton's interpreter here): Qwen2's q/k/v bias goes through the fused LoRA op."""
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    model = with_lora(build(arch))
    inputs = batch(arch)
    want_loss, want_grads = loss_and_grads(model, inputs)
    got_loss, got_grads = loss_and_grads(mrgfast.patch(model), inputs)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


def test_loss_follows_transformers_for_num_items_in_batch_shift_labels_and_ignore_index(one_thread):
    model = with_lora(build("llama"))
    inputs = batch("llama")
    patched = mrgfast.patch(copy.deepcopy(model))
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shifted[0, 5] = 7  # a label only shift_labels carries
    other_ignore = dict(inputs, labels=inputs["labels"].masked_fill(inputs["labels"] == -100, 3), ignore_index=3)
    for case in (dict(inputs, num_items_in_batch=torch.tensor(23)), dict(inputs, num_items_in_batch=5),
                 dict(inputs, shift_labels=shifted), other_ignore):
        want = model(**case).loss
        torch.testing.assert_close(patched(**case).loss, want, **TOL, msg=str(set(case) - set(inputs)))
    nothing = dict(inputs, labels=torch.full_like(inputs["labels"], -100))
    assert model(**nothing).loss.isnan() and patched(**nothing).loss.isnan()  # F.cross_entropy's 0/0, kept


def test_logits_are_returned_without_labels_or_when_asked(one_thread):
    model = with_lora(build("qwen2"))
    inputs = batch("qwen2")
    want = model(**inputs).logits
    plain = mrgfast.patch(copy.deepcopy(model))
    torch.testing.assert_close(plain(input_ids=inputs["input_ids"]).logits, want, **TOL)
    asked = mrgfast.patch(copy.deepcopy(model), return_logits=True)
    torch.testing.assert_close(asked(**inputs).logits, want, **TOL)
    loss, *_ = plain(**inputs, return_dict=False)  # tuple outputs skip the None logits, as transformers' to_tuple
    torch.testing.assert_close(loss, model(**inputs).loss, **TOL)


@pytest.mark.parametrize("keep", [4, torch.tensor([1, 5, 8])], ids=["last_4", "positions"])
def test_logits_to_keep_selects_the_same_positions_as_transformers(keep, one_thread):
    """With labels for the kept positions only, the loss and the logits equal the unpatched model's."""
    model = with_lora(build("llama"))
    inputs = batch("llama")
    kept = inputs["labels"][:, -keep:] if isinstance(keep, int) else inputs["labels"][:, keep]
    case = dict(inputs, labels=kept, logits_to_keep=keep)
    want = model(**case)
    got = mrgfast.patch(copy.deepcopy(model), return_logits=True)(**case)
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    torch.testing.assert_close(got.logits, want.logits, **TOL)


def test_keep_positions_per_sample_positions_and_masks_follow_transformers_rule():
    """2-D logits_to_keep (newer transformers): integer rows gather per sample, a bool mask keeps its True rows."""
    from mrgfast.integrations.causal_lm import keep_positions

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    positions = torch.tensor([[0, 4], [2, 3]])
    want = torch.stack([torch.stack([hidden[b, p] for p in row]) for b, row in enumerate(positions.tolist())])
    torch.testing.assert_close(keep_positions(hidden, positions), want)
    mask = torch.tensor([[True, False, False, True, True], [False, True, False, False, False]])
    want = torch.stack([hidden[b, p] for b in range(2) for p in range(5) if mask[b, p]])
    torch.testing.assert_close(keep_positions(hidden, mask), want)
    torch.testing.assert_close(keep_positions(hidden, 0), hidden)  # 0 keeps every position
    torch.testing.assert_close(keep_positions(hidden, 2), hidden[:, 3:])


def trainer_run(model, arch: str, out_dir, patched: bool):
    """One optimizer step of transformers' Trainer over 2 accumulated micro-batches (so num_items_in_batch
    matters); returns (loss, grad_norm, trainable parameters after the step). SGD: AdamW's first step moves every
    weight by about lr * sign(grad), so gradients of 1e-9 that differ in the last bits would move weights by lr."""
    if patched:
        mrgfast.patch(model)
    micro = [batch(arch, seed=0), batch(arch, seed=5)]
    micro[1]["labels"][..., -2:] = -100  # unequal token counts: a per-micro-batch mean would weigh them wrongly
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=micro,
                                   data_collator=lambda features: features[0])
    trainer.train()
    log = trainer.state.log_history[0]
    return log["loss"], log["grad_norm"], {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}


@pytest.mark.parametrize("arch, peft", [("llama", True), ("qwen2", True), ("qwen2_vl", True), ("qwen2_5_vl", True),
                                        ("llama", False)])
def test_a_whole_trainer_step_matches_unpatched(arch, peft, tmp_path, one_thread):
    base = with_lora(build(arch)) if peft else build(arch)
    want = trainer_run(copy.deepcopy(base), arch, tmp_path / "plain", patched=False)
    got = trainer_run(copy.deepcopy(base), arch, tmp_path / "patched", patched=True)
    assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == pytest.approx(want[1], rel=1e-5)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **TOL, msg=name)


def test_adapter_saved_after_patched_training_loads_into_an_unpatched_model(tmp_path, one_thread):
    model = copy.deepcopy(with_lora(build("llama")))
    trainer_run(model, "llama", tmp_path / "run", patched=True)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "adapter")
    inputs = dict(batch("llama", seed=3), labels=None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, mrgfast.unpatch(model)(**inputs).logits, **TOL)
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_unpatch_restores_bit_identical_behaviour(one_thread):
    model = with_lora(build("qwen2"))
    inputs = batch("qwen2")
    before = loss_and_grads(model, inputs), model(**inputs).logits
    mrgfast.unpatch(mrgfast.patch(model))
    after = loss_and_grads(model, inputs), model(**inputs).logits
    assert forwards(model) == []
    assert torch.equal(after[0][0], before[0][0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(after[0][1][name], grad) for name, grad in before[0][1].items())
    with pytest.raises(ValueError, match="not patched"):
        mrgfast.unpatch(model)


def test_peft_bookkeeping_is_unchanged_active_adapter_disable_and_merge(one_thread):
    model = with_lora(build("llama"))
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".other." in name:
                param.normal_(0, 0.1)
    inputs = batch("llama")
    patched = mrgfast.patch(copy.deepcopy(model))
    for adapter in ("other", "default"):
        model.set_adapter(adapter)
        patched.set_adapter(adapter)
        torch.testing.assert_close(patched(**inputs).loss, model(**inputs).loss, **TOL, msg=adapter)
    with model.disable_adapter(), patched.disable_adapter():
        torch.testing.assert_close(patched(**inputs).loss, model(**inputs).loss, **TOL)
    merged, want = patched.merge_and_unload(), model.merge_and_unload()
    torch.testing.assert_close(merged(**inputs).loss, want(**inputs).loss, **TOL)


@pytest.mark.parametrize("settings, named", [
    (dict(target_modules=["q_proj"]), None),
    (dict(target_modules=["v_proj"], use_dora=True), "layers.1.self_attn.v_proj (Dora)"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "model.embed_tokens (a PEFT Embedding, not lora.Linear)"),
], ids=["lora", "dora", "embedding"])
def test_unsupported_lora_features_stay_on_peft_with_one_warning_naming_them(settings, named, one_thread):
    model = with_lora(build("llama"), **settings)
    inputs = batch("llama")
    want_loss, want_grads = loss_and_grads(model, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mrgfast.patch(model)
        got_loss, got_grads = loss_and_grads(model, inputs)
        loss_and_grads(model, inputs)
    ours = [str(w.message) for w in caught if "mrgfast" in str(w.message)]
    if named is None:
        assert ours == []
    else:
        assert len(ours) == 1 and named in ours[0] and "q_proj" not in ours[0], ours
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


def test_several_active_adapters_and_mixed_adapter_batches_run_on_peft_warned_once(one_thread):
    model = with_lora(build("llama"), target_modules=["q_proj"])
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    inputs = batch("llama")
    patched = mrgfast.patch(copy.deepcopy(model))
    model.eval()  # PEFT takes adapter_names in eval mode only
    patched.eval()
    mixed = dict(inputs, adapter_names=["default", "other"])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(patched(**mixed).loss, model(**mixed).loss, **TOL)
        for peft_model in (model, patched):
            peft_model.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(patched(**inputs).loss, model(**inputs).loss, **TOL)
        patched(**inputs)
    ours = sorted(str(w.message) for w in caught if "mrgfast" in str(w.message))
    assert len(ours) == 2 * 2, ours  # each reason once per q_proj (two layers)
    assert "2 adapters active at once" in ours[0] and "adapter_names" in ours[-1]


def test_lora_bias_and_a_dora_adapter_added_after_patching_stay_on_peft_warned_once(one_thread):
    inputs = batch("llama")
    biased = with_lora(build("llama"), target_modules=["q_proj"], lora_bias=True)
    model = with_lora(build("llama"), target_modules=["q_proj"])
    want = biased(**inputs).loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = mrgfast.patch(biased)(**inputs).loss
        biased(**inputs)
        mrgfast.patch(model)
        model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
        model.set_adapter("dora")
        twin = mrgfast.unpatch(copy.deepcopy(model))  # a deep copy carries the patch; unpatched: PEFT alone
        got_dora, want_dora = model(**inputs).loss, twin(**inputs).loss
        model(**inputs)
    ours = [str(w.message) for w in caught if "mrgfast" in str(w.message)]
    assert len(ours) == 3, ours  # at patch time one for both biased layers; at run time one per DoRA layer
    assert "layers.0.self_attn.q_proj (lora_bias), " in ours[0]
    assert ours[1].endswith("q_proj runs on PEFT's own path: Dora")
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_dora, want_dora, **TOL)


def test_unknown_model_classes_are_refused_and_left_untouched():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="knows LlamaForCausalLM.*not transformers.*GPT2LMHeadModel.*nothing was "
                                        "patched"):
        mrgfast.patch(with_lora(gpt2, target_modules=["c_attn"]))
    assert forwards(gpt2) == []

    class MyLlama(transformers.LlamaForCausalLM):
        """A subclass may change forward: not the class the patch knows."""

    torch.manual_seed(0)
    mine = MyLlama(build("llama").config)
    with pytest.raises(TypeError, match="MyLlama"):
        mrgfast.patch(with_lora(mine))
    assert forwards(mine) == []


def test_refusals_happen_before_anything_changes():
    model = with_lora(build("llama"))
    on_head = with_lora(build("llama"), target_modules=["q_proj", "lm_head"])
    with pytest.raises(TypeError, match="lm_head is a peft.*pass loss=False"):
        mrgfast.patch(on_head)
    with pytest.raises(TypeError, match="lm_head is a peft.*pass loss=False"):
        mrgfast.patch(on_head, norms=True)  # the norms are not patched either
    assert forwards(model) == [] and forwards(on_head) == []
    mrgfast.patch(on_head, loss=False)  # the LoRA layers alone are fine
    with pytest.raises(ValueError, match="already patched"):
        mrgfast.patch(on_head)


def test_importing_mrgfast_does_not_import_the_integrations():
    code = ("import sys, mrgfast; assert 'mrgfast.integrations.hf' not in sys.modules and 'peft' not in sys.modules; "
            "patch = mrgfast.patch; assert 'mrgfast.integrations.hf' in sys.modules; print(patch.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "mrgfast.integrations.hf"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mrgfast.nothing  # noqa: B018


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_norms_put_rms_norm_and_swiglu_into_every_norm_and_mlp_with_the_same_loss_and_gradients(arch, one_thread):
    model = with_lora(build(arch), target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
    inputs = batch(arch)
    want_loss, want_grads = loss_and_grads(model, inputs)
    mrgfast.patch(model, norms=True)
    kinds = {type(m).__name__ for _, m in model.named_modules() if "forward" in m.__dict__}
    assert kinds & norms.RMS_NORMS and kinds & norms.SWIGLU_MLPS  # both kinds really replaced
    got_loss, got_grads = loss_and_grads(model, inputs)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)
    mrgfast.unpatch(model)
    assert forwards(model) == []


@pytest.mark.triton
def test_norms_on_the_triton_kernels_match_unpatched(monkeypatch, one_thread):
    """RMSNorm's and SwiGLU's Triton kernels (in the interpreter here), as a GPU runs them."""
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    model = with_lora(build("llama"), target_modules=["q_proj", "v_proj", "gate_proj"])
    inputs = batch("llama")
    want_loss, want_grads = loss_and_grads(model, inputs)
    got_loss, got_grads = loss_and_grads(mrgfast.patch(model, norms=True), inputs)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)
