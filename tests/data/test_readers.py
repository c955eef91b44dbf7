"""Readers on small files written in tmp_path: R2Gen, PeFoMed lists, VQA-RAD, SLAKE, preference JSONL, CT CSV."""

import json
import os

import numpy as np
import pytest

from mrgfast.data import (BadSampleError, DataFormatError, read_ct_reports, read_preference_jsonl, read_r2gen,
                          read_report_list, read_slake, read_vqa_rad)
from mrgfast.data.samples import describe_stats
from tests.data.files import write_json, write_png


def r2gen_entry(study_id, report, n_views=2, **extra):
    """One R2Gen annotation entry with `n_views` image paths."""
    return {"id": study_id, "report": report, "image_path": [f"{study_id}/{v}.png" for v in range(n_views)],
            "split": "train", **extra}


@pytest.fixture
def r2gen_dir(tmp_path):
    """An R2Gen folder: annotation.json with train/val/test and images/<id>/{0,1}.png for every id."""
    annotation = {
        "train": [r2gen_entry("a", "The heart is normal. No effusion."),
                  r2gen_entry("b", "1. Cardiomegaly. 2. Small left effusion.", labels={"Cardiomegaly": 1})],
        "val": [r2gen_entry("c", "Clear lungs.")],
        "test": [],
    }
    for study in ("a", "b", "c"):
        for view in (0, 1):
            write_png(tmp_path / "images" / study / f"{view}.png")
    write_json(tmp_path / "annotation.json", annotation)
    return tmp_path


def test_r2gen_iu_uses_both_views_and_cleans(r2gen_dir):
    samples = read_r2gen(r2gen_dir / "annotation.json", split="train")
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].image_paths == (str(r2gen_dir / "images/a/0.png"), str(r2gen_dir / "images/a/1.png"))
    assert samples[1].answer == "cardiomegaly . small left effusion ."
    assert samples[1].labels == {"Cardiomegaly": 1} and samples[0].labels is None
    assert samples[0].task == "report" and samples[0].split == "train"
    assert samples.stats["read"] == 2 and samples.stats["kept"] == 2
    assert "annotation.json[train][1]" in samples[1].source


def test_r2gen_mimic_uses_first_view_and_mimic_cleaning(r2gen_dir):
    samples = read_r2gen(r2gen_dir / "annotation.json", split="val", dataset="mimic_cxr")
    assert samples[0].image_paths == (str(r2gen_dir / "images/c/0.png"),)
    assert samples[0].answer == "clear lungs ."


def test_r2gen_truncates_long_reports_and_counts(r2gen_dir):
    long = " ".join(["word"] * 70) + "."
    write_json(r2gen_dir / "annotation.json", {"train": [r2gen_entry("a", long), r2gen_entry("b", "Short.")]})
    samples = read_r2gen(r2gen_dir / "annotation.json")
    assert len(samples[0].answer.split()) == 60  # R2Gen's IU budget
    assert samples.stats["truncated_report"] == 1
    assert len(read_r2gen(r2gen_dir / "annotation.json", max_words=None)[0].answer.split()) == 71


def test_r2gen_other_cleaners(r2gen_dir):
    assert read_r2gen(r2gen_dir / "annotation.json", clean="none")[0].answer == "The heart is normal. No effusion."
    assert read_r2gen(r2gen_dir / "annotation.json", clean="pefomed")[0].answer == "the heart is normal no effusion"


def test_r2gen_empty_report_errors_or_is_skipped(r2gen_dir):
    write_json(r2gen_dir / "annotation.json", {"train": [r2gen_entry("a", "  . "), r2gen_entry("b", "Ok.")]})
    with pytest.raises(BadSampleError, match=r"annotation\.json\[train\]\[0\] \(id=a\): report is empty"):
        read_r2gen(r2gen_dir / "annotation.json")
    samples = read_r2gen(r2gen_dir / "annotation.json", skip_bad_samples=True)
    assert [s.id for s in samples] == ["b"] and samples.stats["skipped_empty_report"] == 1


def test_r2gen_missing_image_errors_or_is_skipped(r2gen_dir):
    (r2gen_dir / "images" / "b" / "1.png").unlink()
    with pytest.raises(BadSampleError, match=r"\(id=b\): image file not found: .*images/b/1\.png"):
        read_r2gen(r2gen_dir / "annotation.json")
    samples = read_r2gen(r2gen_dir / "annotation.json", skip_bad_samples=True)
    assert [s.id for s in samples] == ["a"] and samples.stats["skipped_missing_image"] == 1
    assert len(read_r2gen(r2gen_dir / "annotation.json", check_images=False)) == 2


@pytest.mark.parametrize("content, message", [
    ('{"train": [', r"annotation\.json: invalid JSON at line 1 column 12"),
    ('[1, 2]', r"annotation\.json: expected an object \{'train'"),
    ('{"val": []}', r"annotation\.json: no split 'train'; the file has \['val'\]"),
    ('{"train": {"id": 1}}', r"annotation\.json\[train\]: expected a list of entries"),
    ('{"train": [{"id": "x", "image_path": ["x/0.png", "x/1.png"]}]}',
     r"annotation\.json\[train\]\[0\] \(id=x\): missing field 'report' "
     r"\(expected fields \['id', 'report', 'image_path'\]\)"),
    ('{"train": [{"id": "x", "report": 3, "image_path": []}]}',
     r"annotation\.json\[train\]\[0\]: field 'report' must be a string, got int 3"),
    ('{"train": [{"id": "x", "report": "ok", "image_path": ["x/0.png"]}]}',
     r"\[train\]\[0\] \(id=x\): 'image_path' must list at least 2 path string\(s\) for iu_xray"),
    ('{"train": ["oops"]}', r"\[train\]\[0\]: expected an object with fields"),
    ('{"train": [{"id": "x", "report": "ok", "image_path": ["a", "b"], "labels": {"Edema": 2}}]}',
     r"\[train\]\[0\]: label 'Edema' must be 1, 0, -1 or null, got 2"),
])
def test_r2gen_malformed_files_name_file_entry_and_expectation(tmp_path, content, message):
    (tmp_path / "annotation.json").write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_r2gen(tmp_path / "annotation.json", check_images=False)


def test_reader_argument_and_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        read_r2gen(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="dataset must be one of"):
        read_r2gen(tmp_path / "nothing.json", dataset="chexpert")


def test_pefomed_report_list(tmp_path):
    write_png(tmp_path / "img" / "1.png")
    long = "Word " * 55
    write_json(tmp_path / "ann.json", [{"image_path": "1.png", "report": "The heart: NORMAL; (no effusion)."},
                                       {"image_path": "1.png", "report": long, "id": 7}])
    samples = read_report_list(tmp_path / "ann.json", image_dir=tmp_path / "img", task="caption")
    assert samples[0].answer == "the heart normal no effusion" and samples[0].id == "1.png"
    assert samples[0].task == "caption" and samples[0].image_paths == (str(tmp_path / "img" / "1.png"),)
    assert samples[1].id == "7" and len(samples[1].answer.split()) == 50
    assert samples.stats["truncated_report"] == 1
    write_json(tmp_path / "bad.json", {"image_path": "1.png"})
    with pytest.raises(DataFormatError, match=r"bad\.json: expected a list"):
        read_report_list(tmp_path / "bad.json")


def vqa_rad_entry(qid, answer, answer_type="CLOSED", image="synpic1.jpg"):
    """One VQA-RAD question entry."""
    return {"qid": qid, "image_name": image, "image_organ": "CHEST", "answer": answer, "answer_type": answer_type,
            "question_type": "PRES", "question": "Is there an effusion?", "phrase_type": "freeform"}


def test_vqa_rad(tmp_path):
    write_png(tmp_path / "synpic1.jpg")  # the name's extension does not matter to Pillow
    write_json(tmp_path / "trainset.json", [vqa_rad_entry(1, "Yes"), vqa_rad_entry(2, 3, "OPEN ")])
    samples = read_vqa_rad(tmp_path / "trainset.json")
    assert [(s.id, s.answer, s.answer_type, s.task) for s in samples] == [("1", "Yes", "CLOSED", "vqa"),
                                                                        ("2", "3", "OPEN", "vqa")]
    assert samples[0].prompt == "Is there an effusion?"
    cleaned = read_vqa_rad(tmp_path / "trainset.json", clean_question="pefomed", clean_answer="pefomed")
    assert (cleaned[0].prompt, cleaned[0].answer) == ("is there an effusion?", "yes")


def test_vqa_rad_errors(tmp_path):
    write_json(tmp_path / "q.json", [vqa_rad_entry(1, "yes", "MAYBE")])
    with pytest.raises(DataFormatError, match=r"q\.json\[0\] \(id=1\): 'answer_type' must be one of"):
        read_vqa_rad(tmp_path / "q.json", check_images=False)
    write_json(tmp_path / "q.json", [vqa_rad_entry(1, "")])
    with pytest.raises(BadSampleError, match=r"q\.json\[0\] \(id=1\): answer is empty"):
        read_vqa_rad(tmp_path / "q.json", check_images=False)
    skipped = read_vqa_rad(tmp_path / "q.json", check_images=False, skip_bad_samples=True)
    assert len(skipped) == 0 and skipped.stats["skipped_empty_answer"] == 1


def test_slake_keeps_english(tmp_path):
    write_png(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_id": 1, "img_name": "xmlab1/source.jpg", "answer": "Lung", "answer_type": "OPEN",
            "location": "Chest", "modality": "X-Ray", "base_type": "vqa", "content_type": "Organ"}
    write_json(tmp_path / "train.json", [{**base, "qid": 1, "question": "Which organ?", "q_lang": "en"},
                                         {**base, "qid": 2, "question": "哪个器官?", "q_lang": "zh"}])
    samples = read_slake(tmp_path / "train.json", image_dir=tmp_path / "imgs")
    assert [s.id for s in samples] == ["1"] and samples[0].answer == "Lung"
    assert samples.stats["skipped_language"] == 1 and samples.stats["read"] == 2
    assert [s.id for s in read_slake(tmp_path / "train.json", image_dir=tmp_path / "imgs", language="zh")] == ["2"]


def test_preference_jsonl(tmp_path):
    for name in ("a.png", "b0.png", "b1.png"):
        write_png(tmp_path / name)
    lines = [{"id": "p1", "image": "a.png", "prompt": " Describe. ", "chosen": "No effusion.", "rejected": "Effusion."},
             {"id": 2, "images": ["b0.png", "b1.png"], "prompt": "Describe.", "chosen": "Cardiomegaly.",
              "rejected": "Normal heart."}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    samples = read_preference_jsonl(tmp_path / "pairs.jsonl", clean="iu_xray")
    assert [s.id for s in samples] == ["p1", "2"]
    assert (samples[0].answer, samples[0].rejected, samples[0].prompt) == ("no effusion .", "effusion .", "Describe.")
    assert samples[1].image_paths == (str(tmp_path / "b0.png"), str(tmp_path / "b1.png"))
    assert "pairs.jsonl line 2" in samples[1].source


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "image": "a.png", "prompt": "p", "chosen": "x"', r"pairs\.jsonl: line 1 is not valid JSON"),
    ('{"id": 1, "prompt": "p", "chosen": "x", "rejected": "y"}', r"line 1 \(id=1\): missing field 'images'"),
    ('{"id": 1, "images": [], "prompt": "p", "chosen": "x", "rejected": "y"}',
     r"line 1 \(id=1\): 'images' must be a non-empty list of path strings"),
    ('{"id": 1, "image": "a.png", "prompt": "p", "chosen": "x"}', r"line 1 \(id=1\): missing field 'rejected'"),
    ('{"id": 1, "image": "a.png", "prompt": "p", "chosen": "Same.", "rejected": "same"}',
     r"line 1 \(id=1\): 'chosen' and 'rejected' are the same text"),
])
def test_preference_errors(tmp_path, line, message):
    write_png(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_preference_jsonl(tmp_path / "pairs.jsonl", clean="iu_xray")


@pytest.fixture
def ct_dir(tmp_path):
    """CT-RATE-style files: reports CSV, labels CSV, volumes as .npy (nested folder) and .npz."""
    (tmp_path / "vol" / "train_1").mkdir(parents=True)
    np.save(tmp_path / "vol" / "train_1" / "train_1_a_1.npy", np.zeros((4, 5, 6), dtype=np.int16))
    np.savez(tmp_path / "vol" / "train_2_a_1.npz", volume=np.ones((4, 5, 6), dtype=np.float32))
    (tmp_path / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\n"
        "train_1_a_1.nii.gz,Heart is enlarged.,Cardiomegaly.\n"
        'train_2_a_1.nii.gz,"No effusion, no nodule.",\n', encoding="utf-8")
    (tmp_path / "labels.csv").write_text(
        "VolumeName,Cardiomegaly,Pleural effusion\ntrain_1_a_1.nii.gz,1,0\ntrain_2_a_1.nii.gz,0.0,0.0\n",
        encoding="utf-8")
    return tmp_path


def test_ct_reports_find_converted_volumes_and_labels(ct_dir):
    samples = read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", labels_csv=ct_dir / "labels.csv",
                              report_columns=("Findings_EN", "Impressions_EN"))
    assert [s.id for s in samples] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
    assert samples[0].image_paths == (str(ct_dir / "vol" / "train_1" / "train_1_a_1.npy"),)
    assert samples[1].image_paths == (str(ct_dir / "vol" / "train_2_a_1.npz"),)
    assert samples[0].answer == "Heart is enlarged. Cardiomegaly." and samples[1].answer == "No effusion, no nodule."
    assert samples[0].labels == {"Cardiomegaly": 1, "Pleural effusion": 0} and samples[0].modality == "volume"
    only = read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", labels_csv=ct_dir / "labels.csv",
                           label_names=("Cardiomegaly",))
    assert only[1].labels == {"Cardiomegaly": 0} and only[1].answer == "No effusion, no nodule."


def test_ct_errors(ct_dir):
    with pytest.raises(DataFormatError, match=r"reports\.csv: missing column\(s\) \['Report'\]"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", report_columns=("Report",))
    (ct_dir / "labels.csv").write_text("VolumeName,Cardiomegaly\ntrain_1_a_1.nii.gz,yes\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"labels\.csv row 2 column 'Cardiomegaly': expected 0 or 1, got 'yes'"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", labels_csv=ct_dir / "labels.csv")
    (ct_dir / "labels.csv").write_text("VolumeName,Cardiomegaly\ntrain_1_a_1.nii.gz,1\n", encoding="utf-8")
    with pytest.raises(BadSampleError, match=r"row 3 \(id=train_2_a_1\.nii\.gz\): no row for this volume"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", labels_csv=ct_dir / "labels.csv")
    skipped = read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", labels_csv=ct_dir / "labels.csv",
                              skip_bad_samples=True)
    assert len(skipped) == 1 and skipped.stats["skipped_missing_labels"] == 1
    (ct_dir / "vol" / "train_2_a_1.npz").unlink()
    with pytest.raises(BadSampleError, match=r"row 3 \(id=train_2_a_1\.nii\.gz\): volume file not found"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol")
    with pytest.raises(FileNotFoundError, match="volume folder not found"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "nowhere")


@pytest.mark.parametrize("reports, message", [
    ("VolumeName,Findings_EN\na.npy,ok,extra\n", r"reports\.csv row 2: more cells than the 2 header columns"),
    ("VolumeName,Findings_EN\n,ok\n", r"reports\.csv row 2: column 'VolumeName' is empty"),
    ("", r"reports\.csv: missing column\(s\) \['VolumeName', 'Findings_EN'\]"),
])
def test_ct_malformed_csv(tmp_path, reports, message):
    (tmp_path / "vol").mkdir()
    (tmp_path / "reports.csv").write_text(reports, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_ct_reports(tmp_path / "reports.csv", tmp_path / "vol")


def test_ct_non_utf8_and_label_file_without_labels(tmp_path):
    (tmp_path / "vol").mkdir()
    (tmp_path / "reports.csv").write_bytes(b"VolumeName,Findings_EN\n\xff\xfe,ok\n")
    with pytest.raises(DataFormatError, match=r"reports\.csv: not a readable UTF-8 CSV"):
        read_ct_reports(tmp_path / "reports.csv", tmp_path / "vol")
    (tmp_path / "reports.csv").write_text("VolumeName,Findings_EN\n", encoding="utf-8")
    (tmp_path / "labels.csv").write_text("VolumeName\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"labels\.csv: no label columns besides 'VolumeName'"):
        read_ct_reports(tmp_path / "reports.csv", tmp_path / "vol", labels_csv=tmp_path / "labels.csv")


def test_non_utf8_json_and_jsonl_name_the_file(tmp_path):
    (tmp_path / "annotation.json").write_bytes(b'{"train": ["\xff"]}')
    with pytest.raises(DataFormatError, match=r"annotation\.json: not UTF-8 text"):
        read_r2gen(tmp_path / "annotation.json")
    (tmp_path / "pairs.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl: not UTF-8 text"):
        read_preference_jsonl(tmp_path / "pairs.jsonl")
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        read_preference_jsonl(tmp_path / "none.jsonl")


@pytest.mark.parametrize("escape", ["../outside/x.png", "/etc/passwd", "sub/../../outside/x.png"])
def test_paths_leaving_the_image_directory_are_refused_naming_the_entry(tmp_path, escape):
    """No reader opens (or tells whether there is) a file outside its image directory unless allowed."""
    write_png(tmp_path / "outside" / "x.png")
    write_png(tmp_path / "data" / "a.png")
    data = tmp_path / "data"
    write_json(data / "list.json", [{"image_path": "a.png", "report": "Normal."},
                                    {"image_path": escape, "report": "Normal."}])
    write_json(data / "vqa.json", [vqa_rad_entry(1, "Yes", image=escape)])
    (data / "pairs.jsonl").write_text(json.dumps({"id": 1, "images": ["a.png", escape], "prompt": "p",
                                                  "chosen": "No effusion.", "rejected": "Effusion."}) + "\n")
    reads = [(lambda **k: read_report_list(data / "list.json", **k), r"list\.json\[1\]"),
             (lambda **k: read_vqa_rad(data / "vqa.json", **k), r"vqa\.json\[0\] \(id=1\)"),
             (lambda **k: read_preference_jsonl(data / "pairs.jsonl", **k), r"pairs\.jsonl line 1 \(id=1\)")]
    for read, where in reads:
        with pytest.raises(DataFormatError, match=where + r".*lies outside the image directory"):
            read()
        with pytest.raises(DataFormatError, match="outside"):  # a format error: never skipped as a bad sample
            read(skip_bad_samples=True)
    samples = read_report_list(data / "list.json", allow_outside=True)
    assert samples[1].image_paths == (os.path.normpath(data / escape),)  # opened as checked: '..' resolved


def test_r2gen_and_unchecked_ct_paths_stay_inside_too(r2gen_dir, ct_dir):
    annotation = json.loads((r2gen_dir / "annotation.json").read_text())
    annotation["train"][1]["image_path"][1] = "../annotation.json"
    write_json(r2gen_dir / "annotation.json", annotation)
    with pytest.raises(DataFormatError, match=r"annotation\.json\[train\]\[1\] \(id=b\): image path "
                                              r"'\.\./annotation\.json' lies outside the image directory"):
        read_r2gen(r2gen_dir / "annotation.json")
    assert len(read_r2gen(r2gen_dir / "annotation.json", allow_outside=True)) == 2
    (ct_dir / "reports.csv").write_text("VolumeName,Findings_EN\n../../etc/passwd,Normal.\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="outside"):
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol", check_volumes=False)
    with pytest.raises(BadSampleError, match="volume file not found"):  # checked: looked up among its files only
        read_ct_reports(ct_dir / "reports.csv", ct_dir / "vol")


def test_describe_stats_reads_as_one_line():
    assert describe_stats({"truncated_report": 1, "kept": 8, "read": 9, "skipped_missing_image": 1,
                           "skipped_language": 0}) == "read 9, kept 8, skipped_missing_image 1, truncated_report 1"
    assert describe_stats({}) == "no counts"
