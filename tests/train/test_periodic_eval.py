"""Evaluation during training: when it runs, what it writes, that it leaves training bit-identical, resumes without
duplicate lines, and refuses the setups it cannot serve."""

import json
import shutil

import pytest

from mrgfast.config import ConfigError, load_config, parse_cli
from mrgfast.data import clean_report_iu_xray, clean_report_mimic_cxr
from mrgfast.train import train
from mrgfast.train.periodic_eval import EVAL_LOG, PeriodicEval
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import DEMO, EVAL, eval_lines, logged
from tests.tiny_run import tiny_with_eval as tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_steps_evaluates_and_training_is_unchanged(cache, tmp_path):
    plain = train(tiny(cache, tmp_path / "plain"))
    result = train(tiny(cache, tmp_path / "eval", "eval.every_steps=2", *EVAL))
    out = tmp_path / "eval"
    lines = eval_lines(out)
    assert [line["step"] for line in lines] == [2, 4] == [e["step"] for e in result.evaluations]
    for line in lines:
        assert {"report/BLEU_4", "clinical/macro_f1", "hallucination/rate", "seconds"} <= set(line)
        assert 0.0 <= line["report/BLEU_4"] <= 1.0 and line["seconds"] > 0
        full = json.loads((out / f"eval-step-{line['step']:06d}.json").read_text())
        assert full["n_samples"] == 3 and full["report"]["BLEU_4"] == line["report/BLEU_4"]
        rows = (out / f"eval-step-{line['step']:06d}.generations.jsonl").read_text().splitlines()
        assert len(rows) == 3
    # Evaluation puts the RNG back and trains nothing: the losses are those of the run without it.
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in logged(tmp_path / "plain")]
    assert plain.evaluations == [] and not (tmp_path / "plain" / EVAL_LOG).exists()


class RecordingWriter:
    """A SummaryWriter stand-in that keeps its scalars (tensorboard is not a dependency)."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars[(key, step)] = value

    def flush(self):
        pass

    def close(self):
        pass


def test_at_end_evaluates_once_and_dpo_is_scored_on_reports(cache, tmp_path, monkeypatch):
    from mrgfast.training import telemetry
    writer = RecordingWriter()
    monkeypatch.setattr(telemetry, "open_tensorboard", lambda log_dir: writer)
    result = train(tiny(cache, tmp_path, "mode=dpo", "lora.enabled=true", "eval.at_end=true",
                        "telemetry.tensorboard=true", *EVAL))
    assert [e["step"] for e in result.evaluations] == [4] == [line["step"] for line in eval_lines(tmp_path)]
    rows = [json.loads(line) for line in (tmp_path / "eval-step-000004.generations.jsonl").read_text().splitlines()]
    assert all(row["task"] == "report" and row["reference"] for row in rows)
    # TensorBoard gets the evaluation beside the training scalars, under eval/.
    line = eval_lines(tmp_path)[0]
    assert writer.scalars[("eval/report/BLEU_4", 4)] == line["report/BLEU_4"]
    assert writer.scalars[("eval/hallucination/rate", 4)] == line["hallucination/rate"]
    assert ("loss", 4) in writer.scalars


def test_resume_redoes_the_evaluations_after_its_checkpoint(cache, tmp_path):
    train(tiny(cache, tmp_path, "eval.every_steps=1", *EVAL))
    shutil.rmtree(tmp_path / "step-000004")  # going back to step 2 (a later checkpoint left there is refused)
    train(tiny(cache, tmp_path, "eval.every_steps=1", f"resume={tmp_path / 'step-000002'}", *EVAL))
    assert [line["step"] for line in eval_lines(tmp_path)] == [1, 2, 3, 4]


def test_the_report_metrics_use_the_runs_r2gen_cleaning(cache, tmp_path):
    for extra, expected in (([], clean_report_iu_xray), (["data.clean=mimic_cxr"], clean_report_mimic_cxr)):
        evaluator = PeriodicEval(tiny(cache, tmp_path, *EVAL, *extra), tmp_path)
        evaluator.close()
        assert evaluator.clean is expected


def test_a_missing_split_fails_before_training(cache, tmp_path):
    with pytest.raises(ConfigError, match="eval.split='dev': split must be one of"):
        train(tiny(cache, tmp_path, "eval.every_steps=2", "eval.split=dev"))
    assert not list(tmp_path.glob("step-*"))


@pytest.mark.parametrize("argv, message", [
    (["eval.every_steps=5", "distributed.strategy=fsdp"], "cannot run with distributed.strategy=fsdp"),
    (["eval.at_end=true", "mode=dpo", "data.dataset=preference", "data.path=p.jsonl"],
     "data.dataset=preference has only pairs"),
    (["eval.every_steps=-1"], r"config section 'eval': every_steps must be >= 0"),
    (["eval.limit=0"], r"config section 'eval': limit must be >= 1"),
    (["eval.num_beams=0"], r"config section 'eval': num_beams must be >= 1"),
])
def test_bad_eval_settings_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_cli(argv)


def test_ct_runs_are_evaluated_with_their_volume_preprocessing(tmp_path_factory, tmp_path):
    # Volumes stored at 32^3 and read at 16^3: evaluation must resample them as training does (the run's
    # VolumeConfig), or the 3D ViT would get volumes of the wrong size.
    from pathlib import Path
    config = load_config(Path(DEMO).parent / "rad3d_prefix.yaml", [
        f"output_dir={tmp_path}", f"data.cache_dir={tmp_path_factory.mktemp('ct-cache')}", "data.synthetic_n=12",
        "data.synthetic_volumes=6", "data.synthetic_volume_size=32", "data.image_size=16", "data.rows=1",
        "schedule.max_steps=2", "schedule.warmup_ratio=0", "schedule.warmup_steps=0", "checkpoint.every_steps=100",
        "telemetry.progress_bar=false", "telemetry.tensorboard=false", "resume=none", "eval.at_end=true",
        "eval.split=valid", "eval.max_new_tokens=5", "model.classifier=random", "model.mapper_layers=2"])
    result = train(config)
    assert [e["step"] for e in result.evaluations] == [2] and "report/BLEU_4" in result.evaluations[0]
    from mrgfast.assemble import load_for_eval
    model, tokenizer, builder, media, samples = load_for_eval(result.checkpoint, split="valid")
    assert media.shape == (16, 16, 16) and samples[0].modality == "volume"
