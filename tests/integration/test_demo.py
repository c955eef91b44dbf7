"""The whole embedded demo, run once in fast mode: the pipeline (pretrain -> SFT -> eval -> DPO -> eval) writes what it
promises, its base models load (checked against transformers' Llama) and are cached by their settings, the selection
sweep picks by its rules, and the BLEU-ceiling oracles hold. (The demo's parts alone: tests/demo.)"""

import dataclasses
import json

import pytest
import torch

from mrgfast.data import load_tokenizer
from mrgfast.demo import base_models
from mrgfast.demo.base_models import FAST_SETTINGS, prepare_base_models
from mrgfast.models.vit_io import load_vit
from mrgfast.demo.run import DemoOptions, run_demo
from mrgfast.models import load_decoder

RUNS = ("untrained", "sft", "dpo")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One fast demo run (its cache and output directories, what it returned, what it printed)."""
    root = tmp_path_factory.mktemp("demo")
    options = DemoOptions(fast=True, output_dir=str(root / "out"), cache_dir=str(root / "cache"))
    summary = run_demo(options)
    return dict(root=root, options=options, summary=summary)


def test_fast_demo_writes_eval_json_with_every_run(demo):
    """eval.json holds the untrained, SFT and DPO metrics, the targets, timings and the checkpoints."""
    written = json.loads((demo["root"] / "out" / "eval.json").read_text())
    assert set(written["runs"]) == set(RUNS)
    for run in RUNS:
        metrics = written["runs"][run]
        assert {"report", "clinical", "hallucination", "generation"} <= set(metrics)
        assert (demo["root"] / "out" / f"{run}.generations.jsonl").is_file()
    assert written["targets"] == {"report/BLEU_4": 0.3, "clinical/macro_f1": 0.7}
    assert written["timings"]["total_s"] > 0
    assert written["decoding"] == {"num_beams": 1, "max_new_tokens": 8}  # greedy, the default
    for stage in ("sft", "dpo"):
        assert (demo["root"] / "out" / stage / "config.yaml").is_file()
    assert written["checkpoints"]["sft"].endswith("step-000003")


def test_dpo_reference_is_the_sft_model(demo):
    """DPO reads reference log-probs of every training pair, computed from the SFT model (finite, one chosen and
    one rejected log-prob each, and not the same for the two answers)."""
    from safetensors.torch import load_file
    from mrgfast.data.synthetic import demo_samples
    out = demo["root"] / "out" / "dpo"
    config = (out / "config.yaml").read_text()
    assert "reference: precomputed" in config and "init_from:" in config
    logps = load_file(str(out / "reference_logps.safetensors"))
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=lambda _: None)
    pairs = demo_samples(base.data_dir, "preference", "train")
    assert len(logps) == len(pairs)
    values = torch.stack(list(logps.values()))
    assert values.shape == (len(pairs), 2) and torch.isfinite(values).all() and (values < 0).all()
    assert not torch.equal(values[:, 0], values[:, 1])


def test_base_models_load_and_match_transformers_llama(demo):
    """The decoder directory loads with load_decoder, and transformers' LlamaForCausalLM computes the same logits."""
    import transformers
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=lambda _: None)
    decoder = load_decoder(base.decoder_dir)
    tokenizer = load_tokenizer(base.decoder_dir)
    ids = torch.tensor([tokenizer.encode("the heart size is normal . no pneumothorax .")])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(base.decoder_dir)).eval()
    with torch.no_grad():
        ours = decoder.compute_logits(decoder(input_ids=ids))
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert decoder.config.vocab_size == tokenizer.vocab_size


def test_pretrained_vit_round_trips_with_the_demo_settings(demo):
    """load_vit rebuilds the demo's pretrained ViT (the same features as the demo's ViT architecture given its
    weights) with the demo's image config and image-token count. (load_vit itself: tests/models/test_vit_io.py.)"""
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=lambda _: None)
    vit, image_config, config = load_vit(base.vision_dir)
    fresh = base_models.build_vit(FAST_SETTINGS)
    fresh.load_state_dict(vit.state_dict())
    images = torch.randn(2, 1, FAST_SETTINGS.vit_input, FAST_SETTINGS.vit_input)
    torch.testing.assert_close(vit(images).features, fresh.eval()(images).features)
    assert image_config.size == FAST_SETTINGS.vit_input and image_config.channels == 1
    assert config["image_tokens"] == FAST_SETTINGS.image_tokens
    assert not any(p.requires_grad for p in vit.parameters())


def test_cache_is_reused_and_keyed_by_settings(demo):
    """A second call with the same settings trains nothing; other settings get another directory."""
    messages = []
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=messages.append)
    assert messages == [f"[demo] base models cached in {base.root}"]
    assert base.stats == json.loads((base.root / "done.json").read_text())["stats"]
    other = dataclasses.replace(FAST_SETTINGS, lm_steps=FAST_SETTINGS.lm_steps + 1)
    assert other.key(0) != FAST_SETTINGS.key(0) and FAST_SETTINGS.key(0) != FAST_SETTINGS.key(1)


def test_hint_lands_inside_the_first_image_slot(demo):
    """The pretraining hint replaces placeholder ids inside the first image span only, at any offset; the prompt
    text and the answer stay as the builder made them."""
    import numpy as np
    from mrgfast.data import PromptBuilder
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=lambda _: None)
    tokenizer = load_tokenizer(base.decoder_dir)
    builder = PromptBuilder(tokenizer, "pefomed", image_tokens=[4, 4])
    sample = builder.encode("Describe the image.", "no pneumothorax .")
    hint = tokenizer.encode("left lung nodule")[:3]
    span = sample.spans[0]
    offsets = set()
    for seed in range(20):
        hinted = base_models.with_hint(sample, hint, np.random.default_rng(seed))
        changed = [i for i, (a, b) in enumerate(zip(sample.input_ids, hinted.input_ids)) if a != b]
        assert changed and span.start <= changed[0] and changed[-1] < span.start + span.length
        assert hinted.label_mask == sample.label_mask and len(hinted) == len(sample)
        offsets.add(changed[0])
    assert len(offsets) > 1


def test_selection_scores_on_val_and_picks_by_its_rules(demo):
    """mrgfast.demo.select evaluates every candidate on the val split and its picks are what the stated rules give
    on the metrics it wrote (checked here by recomputing the rules by hand)."""
    from mrgfast.data.synthetic import demo_samples
    from mrgfast.demo.select import BLEU_SLACK, F1_SLACK, Grid, dpo_run_name, run_selection
    out = demo["root"] / "select"
    options = dataclasses.replace(demo["options"], output_dir=str(out))
    grid = Grid.fast()
    run_selection(options, grid)
    written = json.loads((out / "selection.json").read_text())
    assert written["split"] == "val"
    base = prepare_base_models(options.cache_dir, options.seed, FAST_SETTINGS, log=lambda _: None)
    val_ids = [s.id for s in demo_samples(base.data_dir, "report", "val")][:4]  # fast mode scores 4 samples
    dpo_names = [dpo_run_name(written["picked"]["sft_steps"], *candidate) for candidate in grid.dpo]
    assert dpo_names[1].endswith("-rpo1") and not dpo_names[0].endswith("-rpo0")
    for name in [f"sft-{s}-beam{b}" for s in grid.sft_steps for b in grid.beams] + dpo_names:
        rows = [json.loads(line) for line in (out / f"{name}.generations.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == val_ids, name
    sft = written["sft"]
    assert [(c["sft_steps"], c["num_beams"]) for c in sft] == [(s, b) for s in grid.sft_steps for b in grid.beams]
    best = max(sft, key=lambda c: c["metrics"]["report"]["BLEU_4"] + c["metrics"]["clinical"]["macro_f1"])
    assert (written["picked"]["sft_steps"], written["picked"]["num_beams"]) == (best["sft_steps"], best["num_beams"])
    f1, bleu = best["metrics"]["clinical"]["macro_f1"], best["metrics"]["report"]["BLEU_4"]
    eligible = [c for c in written["dpo"] if c["metrics"]["clinical"]["macro_f1"] >= f1 - F1_SLACK
                and c["metrics"]["report"]["BLEU_4"] >= bleu - BLEU_SLACK]
    expected = min(eligible, key=lambda c: (c["metrics"]["hallucination"]["rate"], -c["metrics"]["clinical"]["macro_f1"],
                                            -c["metrics"]["report"]["BLEU_4"])) if eligible else None
    assert written["picked"]["dpo"] == (None if expected is None else
                                        {k: expected[k] for k in ("dpo_steps", "dpo_lr", "dpo_beta", "rpo_alpha")})
    # A second sweep into the same directory reuses the finished runs (resume=auto) and picks the same.
    manifests = sorted(out.glob("*/step-*/manifest.json"))
    stamps = [m.stat().st_mtime_ns for m in manifests]
    run_selection(options, grid)
    assert [m.stat().st_mtime_ns for m in manifests] == stamps and len(manifests) == 4  # 2 SFT + 2 DPO runs
    assert json.loads((out / "selection.json").read_text())["picked"] == written["picked"]


def test_bleu_ceiling_oracles_know_the_findings_not_the_phrasing(demo):
    """The oracles' references are the split's own reports, a fixed phrasing tuned on them scores at least as well
    as the random redraw, and the fixed phrasing never writes a wrong finding (its labels equal the references')."""
    from mrgfast.data.labeler import label_report
    from mrgfast.data.synthetic import reports
    from mrgfast.data.synthetic.demo import chest_xray_studies
    from mrgfast.demo.bleu_ceiling import ceilings, fixed_picker
    result = ceilings("val", FAST_SETTINGS, seed=demo["options"].seed, rounds=1)
    base = prepare_base_models(demo["options"].cache_dir, demo["options"].seed, FAST_SETTINGS, log=lambda _: None)
    annotation = json.loads((base.data_dir / "iu_xray" / "annotation.json").read_text())
    written = {s["id"]: s["report"] for s in annotation["val"]}
    studies = [(i, f, st) for sp, i, f, _, st in chest_xray_studies(0, FAST_SETTINGS.n_studies,
                                                                     FAST_SETTINGS.image_size) if sp == "val"]
    assert result["n"] == len(studies) == len(written) > 0
    assert all(reports.write_report(f, st) == written[i] for i, f, st in studies)
    assert 0 < result["random_phrasing"] <= result["best_fixed_phrasing"] <= 1
    for _, f, st in studies:
        assert label_report(reports.write_report(f, st, fixed_picker(result["choice"]))) == label_report(
            reports.write_report(f, st))
    with pytest.raises(ValueError, match="no studies in split 'dev'"):
        ceilings("dev", FAST_SETTINGS)
