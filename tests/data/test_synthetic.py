"""Synthetic demo data: deterministic, read back by the real readers, findings visible in the pixels."""

import collections
import hashlib
import json

import numpy as np
import pytest

from mrgfast.data import (ImageConfig, MedicalDataset, VolumeConfig, label_report, read_ct_reports,
                          read_preference_jsonl, read_r2gen, read_report_list, read_vqa_rad)
from mrgfast.data.synthetic import (Findings, demo_samples, generate_demo, hallucinate_one, read_manifest,
                                    sample_findings)
from mrgfast.data.synthetic.__main__ import main
from mrgfast.data.synthetic.ct import CTFindings, render_ct
from mrgfast.data.synthetic.cxr import LUNG_X, render_frontal
from mrgfast.data.synthetic.reports import (HABIT_PHRASE, HABIT_RATE, HEART_NORMAL, write_habit_report, write_report,
                                            zipf_weights)
from tests.data.files import DEMO


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(demo_dir, tmp_path):
    generate_demo(tmp_path / "again", **DEMO)
    assert tree_digest(demo_dir) == tree_digest(tmp_path / "again")
    generate_demo(tmp_path / "other", **{**DEMO, "seed": DEMO["seed"] + 1})
    other = tree_digest(tmp_path / "other")
    assert other.keys() == tree_digest(demo_dir).keys()
    assert other["iu_xray/images/synth00000/0.png"] != tree_digest(demo_dir)["iu_xray/images/synth00000/0.png"]


def test_study_depends_only_on_seed_and_index(demo_dir, tmp_path):
    generate_demo(tmp_path / "more", **{**DEMO, "n": DEMO["n"] + 5, "n_volumes": 0})
    bigger = tree_digest(tmp_path / "more")
    for name, digest in tree_digest(demo_dir).items():
        if name.startswith("iu_xray/images/"):
            assert bigger[name] == digest


def test_every_format_reads_back_through_the_readers(demo_dir):
    manifest = read_manifest(demo_dir)
    image_dir = demo_dir / manifest["iu_xray"]["image_dir"]
    total = 0
    for split, count in manifest["iu_xray"]["counts"].items():
        samples = read_r2gen(demo_dir / manifest["iu_xray"]["annotation"], split=split)
        assert len(samples) == count > 0 and samples.stats["kept"] == count
        assert all(len(s.image_paths) == 2 and s.labels is not None for s in samples)
        total += count
    assert total == DEMO["n"]
    vqa = read_vqa_rad(demo_dir / manifest["vqa_rad"]["files"]["train"], image_dir=image_dir)
    assert {s.answer_type for s in vqa} == {"CLOSED", "OPEN"} and len(vqa) == manifest["vqa_rad"]["counts"]["train"]
    pairs = read_preference_jsonl(demo_dir / manifest["preference"]["files"]["train"], image_dir=image_dir)
    assert len(pairs) == manifest["preference"]["counts"]["train"] and all(p.rejected for p in pairs)
    captions = read_report_list(demo_dir / manifest["captions"]["file"], image_dir=image_dir, task="caption")
    assert len(captions) == DEMO["n"]
    ct = manifest["ct"]
    volumes = read_ct_reports(demo_dir / ct["files"]["train"]["reports"], demo_dir / ct["volume_dir"],
                              labels_csv=demo_dir / ct["files"]["train"]["labels"])
    assert len(volumes) == ct["counts"]["train"] and set(volumes[0].labels) == set(ct["labels"])
    item = MedicalDataset(volumes, volume_config=VolumeConfig())[0]
    assert item["pixel_values"].shape == (1,) + (DEMO["volume_size"],) * 3
    image_item = MedicalDataset(read_r2gen(demo_dir / manifest["iu_xray"]["annotation"]), ImageConfig(size=32))[0]
    assert image_item["pixel_values"].shape == (2, 3, 32, 32)


def test_reports_agree_with_ground_truth_through_the_labeler():
    # The labeler must read every synthetic report (raw and R2Gen-cleaned) as its true findings.
    from mrgfast.data.text import clean_report_iu_xray
    for index in range(150):
        findings = sample_findings(np.random.default_rng([11, index]))
        report = write_report(findings, seed=index)
        for text in (report, clean_report_iu_xray(report)):
            got = label_report(text)
            for name, truth in findings.labels().items():
                assert (got[name] or 0) == truth, (text, name)


def test_reports_vary_in_phrasing():
    normal = {write_report(Findings(), seed) for seed in range(40)}
    enlarged = {write_report(Findings(cardiomegaly=True), seed) for seed in range(40)}
    assert len(normal) > 15 and len(enlarged) > 15


def test_phrasings_follow_zipf_frequencies():
    # The first sentence is always the heart's: its 6 phrasings should appear about 1/k as often as the first.
    counts = np.zeros(len(HEART_NORMAL))
    for seed in range(6000):
        first = write_report(Findings(), seed).split(".")[0].lower()
        counts[HEART_NORMAL.index(first)] += 1
    expected = 6000 / np.arange(1, 7) / np.sum(1 / np.arange(1, 7))
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected)), (counts, expected)
    assert list(zipf_weights(3)) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


def test_preference_pairs_differ_in_exactly_one_finding(demo_dir):
    rows = [json.loads(line) for line in (demo_dir / "preference" / "train.jsonl").read_text().splitlines()]
    for row in rows:
        chosen, rejected = label_report(row["chosen"]), label_report(row["rejected"])
        differing = {name for name in ("Cardiomegaly", "Pleural Effusion", "Lung Lesion")
                     if (chosen[name] or 0) != (rejected[name] or 0)}
        sided = {name for name in ("Left Pleural Effusion", "Right Pleural Effusion", "Left Lung Lesion",
                                   "Right Lung Lesion") if (chosen[name] or 0) != (rejected[name] or 0)}
        assert len(differing) == 1 or (not differing and sided), row


def test_preference_pairs_are_cleaned_like_the_reports(demo_dir):
    # DPO must see the text SFT trained on: the chosen answer is the report part's answer, token for token, except
    # where the train report carries the writers' habit: there the chosen report is the faithful one.
    reports = {s.id: s for s in demo_samples(demo_dir, "report", "train")}
    pairs = demo_samples(demo_dir, "preference", "train")
    assert len(pairs) == len(reports)
    for pair in pairs:
        report = reports[pair.id]
        if label_report(report.answer)["Pleural Effusion"] == 1 and not report.labels["Pleural Effusion"]:
            assert pair.answer == report.answer.replace(HABIT_PHRASE, pair.answer.split(" . ")[2].strip(" ."))
        else:
            assert pair.answer == report.answer
        assert pair.rejected == pair.rejected.lower()
    raw = demo_samples(demo_dir, "preference", "train", clean="none")
    assert raw[0].answer != raw[0].answer.lower()  # the file holds the radiologist's casing


def test_train_reports_carry_the_writers_habit_and_the_rest_are_faithful(demo_dir):
    # The habit (reports.HABIT_RATE): train reports of an enlarged heart without effusion state small bilateral
    # effusions about half the time; labels, val and test reports, and the pairs' chosen reports stay faithful.
    manifest = read_manifest(demo_dir)
    habit, eligible = 0, 0
    for split in ("train", "val", "test"):
        for sample in demo_samples(demo_dir, "report", split):
            said = label_report(sample.answer)
            wrong = [n for n, truth in sample.labels.items() if (said[n] or 0) != truth]
            if sample.labels["Cardiomegaly"] and not sample.labels["Pleural Effusion"]:
                eligible += split == "train"
            if wrong:
                assert split == "train" and HABIT_PHRASE in sample.answer, (split, sample.id, wrong)
                assert sorted(wrong) == ["Left Pleural Effusion", "Pleural Effusion", "Right Pleural Effusion"]
                habit += 1
    assert habit == manifest["iu_xray"]["habit_reports"] >= 1 and eligible >= habit
    for pair in demo_samples(demo_dir, "preference", "train"):
        assert HABIT_PHRASE not in pair.answer or label_report(pair.answer)["Pleural Effusion"] == 1


def test_habit_rate_and_splits():
    from mrgfast.data.synthetic.demo import written_with_habit
    applies = Findings(cardiomegaly=True)
    drawn = [written_with_habit("train", applies, 0, i) for i in range(4000)]
    assert abs(np.mean(drawn) - HABIT_RATE) < 4 * np.sqrt(HABIT_RATE * (1 - HABIT_RATE) / 4000)
    others = (Findings(), Findings(cardiomegaly=True, effusion="left"), Findings(nodule="right"))
    assert not any(written_with_habit(split, applies, 0, i) for split in ("val", "test") for i in range(200))
    assert not any(written_with_habit("train", f, 0, i) for f in others for i in range(200))


def test_habit_report_changes_only_the_effusion_sentence():
    findings = Findings(cardiomegaly=True, nodule="left")
    for seed in range(30):
        faithful, habit = write_report(findings, seed).split(". "), write_habit_report(findings, seed).split(". ")
        differing = [(a, b) for a, b in zip(faithful, habit) if a != b]
        assert len(differing) <= 2 and HABIT_PHRASE.capitalize() in habit[2]
        assert faithful[:2] == habit[:2]
    with pytest.raises(ValueError, match="not to Findings"):
        write_habit_report(Findings(cardiomegaly=True, effusion="left"), 0)


def test_hallucinate_one_injects_exactly_one_hallucination():
    kinds = collections.Counter()
    for index in range(200):
        rng = np.random.default_rng([5, index])
        findings = sample_findings(rng)
        wrong, change = hallucinate_one(findings, rng)
        changed = [f for f in ("cardiomegaly", "effusion", "nodule") if getattr(wrong, f) != getattr(findings, f)]
        assert len(changed) == 1 and changed[0] in change
        # A hallucination: the wrong findings assert something the study does not have.
        assert any(wrong.labels()[name] and not findings.labels()[name] for name in findings.labels()), change
        kinds["swapped" if "swapped" in change else "added"] += 1
    assert kinds["added"] > 50 and kinds["swapped"] > 10, kinds


def test_vqa_answers_match_the_annotation(demo_dir):
    labels = {e["image_path"][0]: e["labels"] for split in ("train", "val", "test")
              for e in json.loads((demo_dir / "iu_xray" / "annotation.json").read_text())[split]}
    for row in json.loads((demo_dir / "vqa_rad" / "trainset.json").read_text()):
        truth = labels[row["image_name"]]
        if row["question"] == "is the heart enlarged?":
            assert row["answer"] == ("yes" if truth["Cardiomegaly"] else "no")
        if row["question"] == "which side is the pleural effusion on?":
            sides = [s for s in ("left", "right") if truth[f"{s.capitalize()} Pleural Effusion"]]
            assert row["answer"] == (sides[0] if len(sides) == 1 else "both")


def _renders(findings_of, n=120, size=64, seed=21):
    """(findings, frontal image) for n seeded studies, findings adjusted by `findings_of`."""
    out = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        findings = findings_of(sample_findings(rng), index)
        out.append((findings, render_frontal(findings, rng, size)))
    return out


def heart_width(image):
    """Fraction of a row at heart level brighter than 80% of the way from lung to the brightest tissue."""
    s = image.shape[0]
    lung = np.median(image[int(.3 * s):int(.45 * s), int(.25 * s):int(.35 * s)])
    rows = image[int(.6 * s):int(.68 * s), int(.2 * s):int(.85 * s)]
    threshold = lung + 0.8 * (np.percentile(rows, 95) - lung)
    return np.median((rows > threshold).mean(axis=1))


def test_cardiomegaly_is_visible_as_heart_width():
    studies = _renders(lambda f, i: f)
    normal = [heart_width(img) for f, img in studies if not f.cardiomegaly]
    enlarged = [heart_width(img) for f, img in studies if f.cardiomegaly]
    assert len(normal) > 20 and len(enlarged) > 20
    assert max(normal) < min(enlarged)


def test_effusion_side_is_visible_at_the_lung_bases():
    sides = ("left", "right")
    studies = _renders(lambda f, i: Findings(f.cardiomegaly, sides[i % 2], f.nodule))
    s = studies[0][1].shape[0]
    rows = slice(int(.66 * s), int(.74 * s))
    for findings, image in studies:
        # The patient's left base is on the image's right (frontal PA convention).
        difference = image[rows, int(.70 * s):int(.78 * s)].mean() - image[rows, int(.22 * s):int(.30 * s)].mean()
        assert (difference > 0.1) if findings.effusion == "left" else (difference < -0.1)


def test_nodule_side_is_visible_as_a_local_bright_spot():
    def spot(image, side):
        s = image.shape[0]
        padded = np.pad(image, 3, mode="edge")
        local = sum(padded[dy:dy + s, dx:dx + s] for dy in range(7) for dx in range(7)) / 49.0
        cx = LUNG_X[side]
        return (image - local)[int(.28 * s):int(.52 * s), int((cx - .08) * s):int((cx + .08) * s)].max()
    studies = _renders(lambda f, i: f, n=160)
    scores = {True: [], False: []}
    for findings, image in studies:
        for side in ("left", "right"):
            scores[findings.nodule == side].append(spot(image, side))
    threshold = (np.median(scores[True]) + np.median(scores[False])) / 2
    accuracy = np.mean([v > threshold for v in scores[True]] + [v <= threshold for v in scores[False]])
    assert len(scores[True]) > 20 and accuracy > 0.97


def test_findings_are_learnable_by_a_linear_classifier_on_pixels():
    # Ridge regression on raw 32x32 pixels of 200 studies, scored on 100 held-out ones.
    features, targets = [], []
    for index in range(300):
        rng = np.random.default_rng([31, index])
        findings = sample_findings(rng)
        features.append(np.append(render_frontal(findings, rng, 32).ravel(), 1.0))
        labels = findings.labels()
        targets.append([labels["Cardiomegaly"], labels["Left Pleural Effusion"], labels["Right Pleural Effusion"]])
    x, y = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    weights = np.linalg.solve(x[:200].T @ x[:200] + np.eye(x.shape[1]), x[:200].T @ y[:200])
    accuracy = ((x[200:] @ weights > 0.5) == y[200:]).mean(axis=0)
    majority = np.maximum(y[200:].mean(axis=0), 1 - y[200:].mean(axis=0))
    assert (accuracy >= 0.95).all() and (accuracy > majority + 0.1).all(), (accuracy, majority)


def test_ct_findings_are_visible():
    normal = render_ct(CTFindings(), np.random.default_rng(0), 32).astype(np.float32)
    big = render_ct(CTFindings(cardiomegaly=True), np.random.default_rng(0), 32).astype(np.float32)
    emphysema = render_ct(CTFindings(emphysema=True), np.random.default_rng(0), 32).astype(np.float32)
    left = render_ct(CTFindings(effusion="left"), np.random.default_rng(0), 32).astype(np.float32)
    heart = lambda v: ((v > 20) & (v < 80))[:, :16, 8:24].sum()  # noqa: E731 - anterior mediastinum
    assert heart(big) > 1.5 * heart(normal)
    lung = lambda v: np.median(v[10:18, 13:20, 7:12])  # noqa: E731 - centre of the patient's right lung
    assert lung(emphysema) < lung(normal) - 80
    # Posterior lung bases (axis 2 runs from the patient's right to left): fluid is near 0 HU, lung near -830.
    base = lambda v, xs: np.median(v[16:22, 22:25, xs])  # noqa: E731
    assert base(left, slice(20, 25)) > -200 and base(left, slice(7, 12)) < -600
    assert base(normal, slice(20, 25)) < -600


def test_demo_samples_reads_each_part(demo_dir):
    manifest = read_manifest(demo_dir)
    report = demo_samples(demo_dir, "report", "test")
    assert len(report) == manifest["iu_xray"]["counts"]["test"] and report[0].task == "report"
    assert demo_samples(demo_dir, "vqa", "val")[0].task == "vqa"
    assert demo_samples(demo_dir, "preference", "train")[0].rejected
    assert demo_samples(demo_dir, "caption")[0].task == "caption"
    assert demo_samples(demo_dir, "ct", "valid")[0].modality == "volume"
    assert demo_samples(demo_dir, "report", "train", max_words=3).stats["truncated_report"] > 0
    with pytest.raises(ValueError, match="part must be one of"):
        demo_samples(demo_dir, "segmentation")
    with pytest.raises(ValueError, match="split must be one of"):
        demo_samples(demo_dir, "report", "valid")
    with pytest.raises(ValueError, match="ct split must be one of"):
        demo_samples(demo_dir, "ct", "test")


def test_cli_writes_the_demo(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--seed", "1", "--n", "3", "--size", "32", "--n-volumes", "2",
          "--volume-size", "8"])
    assert "wrote the synthetic datasets" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "cli")
    assert sum(manifest["iu_xray"]["counts"].values()) == 3 and sum(manifest["ct"]["counts"].values()) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2), "n must be at least 3"), (dict(size=16), "size must be >= 32"),
    (dict(n_volumes=1), "n_volumes must be at least 2"),
])
def test_generate_demo_argument_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_demo(tmp_path, **{**DEMO, **kwargs})


def test_findings_validation_and_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="effusion must be None or one of"):
        Findings(effusion="middle")
    with pytest.raises(ValueError, match="nodule must be None or one of"):
        Findings(nodule="both")
    with pytest.raises(FileNotFoundError, match="python -m mrgfast.data.synthetic"):
        read_manifest(tmp_path)
