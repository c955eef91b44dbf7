"""mrgfast.onpolicy_pairs: which drawn report becomes the rejected one, the written file read back by the preference
reader, the draws reproducible from the seed, and the CLI's argument errors."""

import json
import os

import pytest

from mrgfast import onpolicy_pairs
from mrgfast.data import clean_report_iu_xray
from mrgfast.data.preference import read_preference_jsonl
from mrgfast.data.samples import Sample
from mrgfast.data.synthetic import demo_samples, generate_demo
from mrgfast.onpolicy_pairs import PairOptions, build_onpolicy_pairs, choose_pairs, hallucinated
from tests.tiny_multimodal import IMAGE, tiny_lm_with_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic twin's train reports, its tokenizer, an untrained tiny MultimodalLM and its prompt builder."""
    root = tmp_path_factory.mktemp("onpolicy")
    generate_demo(root / "data", seed=2, n=12, size=32, n_volumes=0)
    samples = list(demo_samples(root / "data", "report", "train"))
    tokenizer, model, builder = tiny_lm_with_tokenizer([s.answer for s in samples], root / "tok")
    return dict(root=root, model=model, tokenizer=tokenizer, builder=builder, samples=samples)


def report_sample(sample_id: str, answer: str) -> Sample:
    """A report Sample with two image paths."""
    return Sample(id=sample_id, task="report", prompt="Describe.", answer=answer, image_paths=("a.png", "b.png"))


def test_hallucinated_lists_findings_asserted_beyond_the_reference():
    reference = "The heart is enlarged. No pleural effusion. No pneumothorax."
    assert hallucinated(reference, "the heart is enlarged . small left pleural effusion .") == [
        "Pleural Effusion", "Left Pleural Effusion"]
    assert hallucinated(reference, "the heart is enlarged . no pleural effusion .") == []
    assert hallucinated(reference, "no acute cardiopulmonary abnormality .") == []  # omissions are not counted
    assert hallucinated("No acute cardiopulmonary abnormality.", "there is a right lung nodule .") == [
        "Lung Lesion", "Right Lung Lesion"]


def test_choose_pairs_takes_the_closest_wrong_draw_and_skips_clean_studies():
    samples = [report_sample("a", "Normal heart size. No pleural effusion."),
               report_sample("b", "Normal heart size. No focal nodule.")]
    drawn = [["normal heart size . no pleural effusion .",                       # faithful
              "the heart is enlarged . bilateral pleural effusions .",          # four hallucinated findings
              "normal heart size . there is a left lung nodule .",              # two
              "normal heart size . there is a right lung nodule ."],            # two, drawn later
             ["normal heart size . no focal nodule .", "the heart size is normal ."]]
    rows, counts = choose_pairs(samples, drawn)
    assert counts == {"studies": 2, "drawn": 6, "drawn_with_hallucination": 3, "pairs": 1}
    (row,) = rows
    assert row["id"] == "a" and row["rejected"] == drawn[0][2]
    assert row["chosen"] == clean_report_iu_xray(samples[0].answer)
    assert row["change"] == "hallucinated: Lung Lesion, Left Lung Lesion"
    assert row["images"][0].endswith("a.png") and row["images"][0].startswith("/")
    with pytest.raises(ValueError, match="2 samples but 1 lists"):
        choose_pairs(samples, drawn[:1])


def test_draws_are_grouped_per_sample_and_fixed_by_the_seed(tiny):
    # top_k=1 makes every draw the greedy report, so each group must hold its own sample's greedy text K times.
    model, tok, samples, builder = tiny["model"], tiny["tokenizer"], tiny["samples"][:4], tiny["builder"]
    greedy = onpolicy_pairs.generate_texts(model, tok, samples, builder, IMAGE, max_new_tokens=10)
    drawn = onpolicy_pairs.draw_reports(model, tok, samples, builder, IMAGE,
                                        PairOptions(num_samples=3, top_k=1, max_new_tokens=10))
    assert drawn == [[text] * 3 for text in greedy]
    hot = PairOptions(num_samples=3, temperature=2.0, max_new_tokens=10, seed=4)
    first = onpolicy_pairs.draw_reports(model, tok, samples, builder, IMAGE, hot)
    assert first == onpolicy_pairs.draw_reports(model, tok, samples, builder, IMAGE, hot)
    assert first != onpolicy_pairs.draw_reports(model, tok, samples, builder, IMAGE, PairOptions(
        num_samples=3, temperature=2.0, max_new_tokens=10, seed=5))
    assert all(len(group) == 3 and len(set(group)) > 1 for group in first)


def test_built_pairs_read_back_through_the_preference_reader(tiny, tmp_path, monkeypatch):
    # Draws stand in for a model's samples: one study's draws hallucinate a right effusion, the others' are faithful.
    samples = tiny["samples"]
    answers = {s.id: clean_report_iu_xray(s.answer) for s in samples}
    target = next(s for s in samples if not s.labels["Pleural Effusion"])
    wrong = answers[target.id].replace(" . ", " . there is a right pleural effusion . ", 1)

    def draw(model, tok, reports, builder, image, options):
        return [[answers[s.id], wrong] if s.id == target.id else [answers[s.id]] * 2 for s in reports]

    monkeypatch.setattr(onpolicy_pairs, "draw_reports", draw)
    out = tmp_path / "pairs.jsonl"
    counts = build_onpolicy_pairs(tiny["model"], tiny["tokenizer"], samples, tiny["builder"], IMAGE, out)
    assert counts == {"studies": len(samples), "drawn": 2 * len(samples), "drawn_with_hallucination": 1, "pairs": 1}
    (pair,) = read_preference_jsonl(out, allow_outside=True)  # absolute image paths: the file reads from anywhere
    assert (pair.id, pair.answer, pair.rejected) == (target.id, answers[target.id], wrong)
    assert list(pair.image_paths) == [str(p) for p in map(os.path.abspath, target.image_paths)]
    assert json.loads(out.read_text())["change"] == "hallucinated: Pleural Effusion, Right Pleural Effusion"


def test_no_hallucinated_draw_is_an_error_and_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(onpolicy_pairs, "draw_reports",
                        lambda model, tok, samples, builder, image, options: [[s.answer] for s in samples])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(ValueError, match="none of the 9 drawn reports asserts a finding"):
        build_onpolicy_pairs(tiny["model"], tiny["tokenizer"], tiny["samples"], tiny["builder"], IMAGE, out)
    assert not out.exists()
    with pytest.raises(ValueError, match="need report samples"):
        build_onpolicy_pairs(tiny["model"], tiny["tokenizer"], [], tiny["builder"], IMAGE, out)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        PairOptions(num_samples=0)


@pytest.mark.parametrize("argv,message", [(["checkpoint=x"], "out= required"),
                                          (["out=y.jsonl"], "checkpoint= required"),
                                          (["checkpoint"], "expected key=value"),
                                          (["checkpoint=x", "out=y", "num_samples=0"], "num_samples must be"),
                                          (["checkpoint=x", "out=y", "temperature=hot"],
                                           "'temperature': expected a number, got 'hot'"),
                                          (["checkpoint=x", "out=y", "top_k=0.5"], "'top_k': expected an integer"),
                                          # sampling options are checked before the checkpoint is looked at
                                          (["checkpoint=x", "out=y", "temperature=0"], "temperature must be"),
                                          (["checkpoint=x", "out=y", "top_p=1.5"], "top_p must be in (0, 1]"),
                                          (["checkpoint=x", "out=y", "top_k=-1"], "top_k must be >= 0"),
                                          (["checkpoint=x", "out=y", "max_new_tokens=0"], "max_new_tokens must be")])
def test_cli_argument_errors(argv, message, capsys):
    assert onpolicy_pairs.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback


def test_cli_names_a_missing_checkpoint_in_one_line(capsys):
    assert onpolicy_pairs.main(["checkpoint=/nonexistent/step-000001", "out=y"]) == 3  # exit_codes.IO
    assert capsys.readouterr().err == ("mrgfast.onpolicy_pairs: checkpoint=/nonexistent/step-000001: not a "
                                       "directory\n")
