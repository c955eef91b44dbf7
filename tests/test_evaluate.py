"""mrgfast.evaluate: batched KV-cache generation against a recompute-everything greedy loop, every metric key, the
metric wiring against the metric functions themselves, output files, and the CLI on a checkpoint from train()."""

import json
from pathlib import Path

import pytest
import torch

from mrgfast import evaluate
from mrgfast.assemble.evaluation import load_for_eval
from mrgfast.data import PromptBuilder, clean_report_iu_xray, clean_report_mimic_cxr, label_report
from mrgfast.data.dataset import MedicalDataset
from mrgfast.data.packing import PlacedSpan
from mrgfast.data.synthetic import demo_samples, generate_demo
from mrgfast.config import load_config
from mrgfast.metrics import clinical_metrics, java_available, report_metrics, vqa_accuracy
from tests.tiny_multimodal import IMAGE, tiny_lm_with_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
REPORT_KEYS = {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"}
CLINICAL_KEYS = {"micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1",
                 "n_reports", "n_findings", "per_finding", "findings"}
HALLUCINATION_KEYS = {"rate", "mean_per_report", "reports_with_hallucination", "hallucinated", "asserted"}
VQA_KEYS = {"overall", "closed", "open", "n_overall", "n_closed", "n_open"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic twin, its tokenizer, a tiny MultimodalLM (ViT -> GroupedProjection -> decoder) and a builder."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_demo(root / "data", seed=1, n=10, size=32, n_volumes=0)
    reports = list(demo_samples(root / "data", "report", "test"))
    questions = list(demo_samples(root / "data", "vqa", "test"))[:3]
    texts = [s.answer for s in demo_samples(root / "data", "report", "train")] + [s.prompt for s in questions]
    tokenizer, model, builder = tiny_lm_with_tokenizer(texts + [s.answer for s in questions], root / "tok")
    vqa_builder = PromptBuilder(tokenizer, "pefomed", **model.builder_kwargs("pefomed", views=1))
    return dict(root=root, model=model, tokenizer=tokenizer, builder=builder, samples=reports, vqa=questions,
                vqa_builder=vqa_builder)


def greedy_reference(model, tokenizer, builder, item, max_new_tokens):
    """Greedy decoding that recomputes the whole sequence every step (no KV cache, no batching): the oracle."""
    prompt = builder.encode(item["prompt"], "", item["task"])
    ids = torch.tensor([prompt.input_ids[:prompt.prompt_length]])
    spans = [PlacedSpan(s.kind, 0, s.index, s.start, s.length) for s in prompt.spans]
    embeds = model.splice(model.decoder.embed(ids), spans, item["pixel_values"][None])
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.decoder.compute_logits(model.decoder(inputs_embeds=embeds))[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
            embeds = torch.cat([embeds, model.decoder.embed(torch.tensor([[token]]))], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("part", ["samples", "vqa"])
def test_batched_generation_matches_recomputed_greedy(tiny, part):
    """Batched generation (questions of different lengths in one batch; two-view reports) equals the
    one-at-a-time oracle's text for every sample."""
    samples, builder = tiny[part], tiny["builder" if part == "samples" else "vqa_builder"]
    texts = evaluate.generate_texts(tiny["model"], tiny["tokenizer"], samples, builder, IMAGE, batch_size=2,
                                    max_new_tokens=6)
    dataset = MedicalDataset(samples, image_config=IMAGE)
    expected = [greedy_reference(tiny["model"], tiny["tokenizer"], builder, dataset[i], 6)
                for i in range(len(samples))]
    assert texts == expected
    assert any(texts)


def test_every_metric_key_and_the_wiring(tiny, tmp_path):
    """Every metric is present and equals the metric function applied to the written generations."""
    samples = tiny["samples"]
    metrics = evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], samples, tiny["builder"], IMAGE,
                                      batch_size=4, max_new_tokens=5, meteor=False, output_dir=tmp_path, name="run",
                                      log=None)
    assert set(metrics) == {"n_samples", "data", "report", "clinical", "hallucination", "generation"}
    assert set(metrics["report"]) == REPORT_KEYS
    assert set(metrics["clinical"]) == CLINICAL_KEYS
    assert set(metrics["hallucination"]) == HALLUCINATION_KEYS
    assert metrics["generation"]["num_beams"] == 1 and metrics["n_samples"] == len(samples)
    questions = tiny["vqa"]
    vqa_metrics = evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], questions, tiny["vqa_builder"], IMAGE,
                                          batch_size=2, max_new_tokens=5, num_beams=2, output_dir=tmp_path,
                                          name="vqa", log=None)
    assert set(vqa_metrics) == {"n_samples", "data", "vqa", "generation"} and set(vqa_metrics["vqa"]) == VQA_KEYS
    vqa_rows = [json.loads(line) for line in (tmp_path / "vqa.generations.jsonl").read_text().splitlines()]
    assert vqa_metrics["vqa"] == vqa_accuracy([r["generation"] for r in vqa_rows], [s.answer for s in questions],
                                              [s.answer_type for s in questions])

    rows = [json.loads(line) for line in (tmp_path / "run.generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert [r["reference"] for r in rows] == [s.answer for s in samples]
    reports = [(r, s) for r, s in zip(rows, samples) if s.task == "report"]
    refs, hyps = [s.answer for _, s in reports], [r["generation"] for r, _ in reports]
    assert metrics["report"] == report_metrics(refs, hyps, clean=clean_report_iu_xray, meteor=False)
    ref_labels, gen_labels = [label_report(t) for t in refs], [label_report(t) for t in hyps]
    supported = metrics["clinical"]["findings"]
    assert supported and all(any(lab.get(f) == 1 for lab in ref_labels) for f in supported)
    expected = clinical_metrics(ref_labels, gen_labels, findings=supported)
    assert metrics["clinical"]["macro_f1"] == expected["macro_f1"]
    assert [r["ref_findings"] for r, _ in reports] == [[k for k, v in lab.items() if v == 1] for lab in ref_labels]
    assert json.loads((tmp_path / "run.json").read_text())["report"] == metrics["report"]
    table = evaluate.summary_table({"a": metrics, "b": metrics})
    assert "report/BLEU_4" in table and "clinical/macro_f1" in table and len(table.splitlines()) < 25


@pytest.mark.skipif(not java_available(), reason="METEOR needs java")
def test_meteor_with_java(tiny):
    """With Java, METEOR joins the report metrics."""
    reports = tiny["samples"][:2]
    metrics = evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], reports, tiny["builder"], IMAGE,
                                      max_new_tokens=3, meteor=True, log=None)
    assert "METEOR" in metrics["report"] and "vqa" not in metrics


def test_bad_arguments_raise(tiny):
    """No samples, a bad batch size, a missing checkpoint argument or directory: clear errors."""
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], [], tiny["builder"], IMAGE)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.generate_texts(tiny["model"], tiny["tokenizer"], tiny["samples"], tiny["builder"], IMAGE,
                                batch_size=0)
    with pytest.raises(ValueError, match="evaluate each dataset on its own"):
        evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], tiny["samples"] + tiny["vqa"], tiny["builder"], IMAGE)
    with pytest.raises(ValueError, match="checkpoint= required: a step-XXXXXX directory"):
        evaluate.parse_args(["split=test"])
    with pytest.raises(ValueError, match="key=value"):
        evaluate.parse_args(["checkpoint"])
    with pytest.raises(ValueError, match="'num_beams': expected an integer, got 'abc'"):
        evaluate.parse_args(["checkpoint=x", "num_beams=abc"])
    for key in ("num_beams", "max_new_tokens", "batch_size", "limit"):
        with pytest.raises(ValueError, match=f"{key}=0: expected an integer >= 1"):
            evaluate.parse_args(["checkpoint=x", f"{key}=0"])
    with pytest.raises(ValueError, match="'meteor': expected true or false, got 'flase'"):
        evaluate.parse_args(["checkpoint=x", "meteor=flase"])
    options, overrides = evaluate.parse_args(["checkpoint=x", "limit=none", "meteor=no", "num_beams=3", "data=/d",
                                              "model.dtype=float32"])
    assert (options.limit, options.meteor, options.num_beams) == (None, False, 3)
    assert overrides == ["data.path=/d", "model.dtype=float32"]
    assert evaluate.main(["checkpoint=/nonexistent/step-000001"]) == 3  # a checkpoint error (exit_codes.IO)


def test_cli_loads_a_trainer_checkpoint(tmp_path, capsys, monkeypatch):
    """train() writes a checkpoint; the CLI rebuilds the model from its config.yaml, loads the adapter and the
    projector, and writes eval.json + generations; the loaded weights are the trained ones."""
    from mrgfast.train import train
    out = tmp_path / "run"
    config = load_config(DEMO, ["model.hidden_size=32", "model.intermediate_size=64", "model.vision_dim=16",
                                "model.vision_depth=1", f"data.cache_dir={tmp_path / 'cache'}", "data.synthetic_n=12",
                                "data.synthetic_size=32", "data.synthetic_volumes=0", "data.token_budget=256",
                                "data.rows=1", "data.max_length=256", "schedule.max_steps=2",
                                "schedule.warmup_steps=0", "optim.lr=0.05", "telemetry.progress_bar=false",
                                "telemetry.tensorboard=false", "resume=none", f"output_dir={out}"])
    result = train(config)
    assert evaluate.main([f"checkpoint={result.checkpoint}", "limit=2", "max_new_tokens=4", "meteor=false"]) == 0
    written = json.loads((result.checkpoint / "eval" / "eval.json").read_text())
    assert written["n_samples"] == 2 and "BLEU_4" in written["report"]
    lines = (result.checkpoint / "eval" / "eval.generations.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert "report/BLEU_4" in capsys.readouterr().out
    # The CLI scores with the run's R2Gen cleaning (here the run is re-read as MIMIC-cleaned text).
    cleanings, real_evaluate = [], evaluate.evaluate_model

    def recording_evaluate(*args, **kwargs):
        cleanings.append(kwargs["clean"])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", recording_evaluate)
    assert evaluate.main([f"checkpoint={result.checkpoint}", "limit=1", "max_new_tokens=2", "meteor=false",
                          "data.clean=mimic_cxr", f"output_dir={tmp_path / 'mimic-cleaned'}"]) == 0
    assert cleanings == [clean_report_mimic_cxr]
    model = load_for_eval(result.checkpoint)[0]
    trained = {k: v for k, v in result.model.state_dict().items() if "lora_" in k or k.startswith("adapters.")}
    loaded = model.state_dict()
    assert trained and any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_bad_samples_are_skipped_and_counted_only_when_asked(tiny, tmp_path):
    import dataclasses
    from mrgfast.data.errors import BadSampleError
    from mrgfast.data.samples import SampleSet
    bad_file = tmp_path / "bad.png"
    bad_file.write_bytes(b"not a png")
    good = tiny["samples"][:2]
    samples = SampleSet(good + [dataclasses.replace(good[0], id="bad", image_paths=(str(bad_file),) * 2)],
                        {"read": 4, "skipped_missing_image": 1})
    kept, stats = evaluate.loadable_samples(samples, IMAGE, skip_bad_samples=True)
    assert [s.id for s in kept] == [s.id for s in good]
    assert stats == {"read": 4, "skipped_missing_image": 1, "skipped_corrupt_image": 1, "kept": 2}
    assert len(evaluate.loadable_samples(samples, IMAGE, skip_bad_samples=False)[0]) == 3
    metrics = evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], samples, tiny["builder"], IMAGE,
                                      max_new_tokens=2, meteor=False, log=None, skip_bad_samples=True)
    assert metrics["n_samples"] == 2 and metrics["data"]["skipped_corrupt_image"] == 1
    with pytest.raises(BadSampleError, match="cannot decode image"):
        evaluate.evaluate_model(tiny["model"], tiny["tokenizer"], samples, tiny["builder"], IMAGE,
                                max_new_tokens=2, meteor=False, log=None)
