"""Write the synthetic demo datasets to disk in the formats the real readers read (R2Gen, VQA-RAD, JSONL, CSV)."""

import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mrgfast.data.ct import CT_RATE_LABELS
from mrgfast.data.r2gen import DEFAULT_REPORT_INSTRUCTION
from mrgfast.data.synthetic.ct import render_ct, sample_ct_findings, write_ct_report
from mrgfast.data.synthetic.cxr import render_frontal, render_lateral, to_uint8
from mrgfast.data.synthetic.findings import hallucinate_one, sample_findings
from mrgfast.data.synthetic.reports import HABIT_RATE, habit_applies, write_habit_report, write_report
from mrgfast.data.synthetic.vqa import study_questions

SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
MANIFEST = "manifest.json"


def _splits(n: int, seed: int) -> list:
    """A split name per index: a seeded permutation cut 70/10/20 (every split non-empty when n >= 3)."""
    order = np.random.default_rng([seed, 2**20]).permutation(n)
    n_val = max(1, round(n * SPLIT_FRACTIONS[1][1])) if n >= 3 else 0
    n_test = max(1, round(n * SPLIT_FRACTIONS[2][1])) if n >= 3 else 0
    names = ["train"] * n
    for rank, index in enumerate(order):
        if rank < n_val:
            names[index] = "val"
        elif rank < n_val + n_test:
            names[index] = "test"
    return names


def _write_json(path: Path, data) -> None:
    """Write JSON with a fixed layout (same input, same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def chest_xray_studies(seed: int, n: int, size: int):
    """Every study of the chest X-ray set, in order: (split, study id, findings, [frontal, lateral] images, report
    style seed); the one source of what write_chest_xray writes."""
    for index, split in enumerate(_splits(n, seed)):
        rng = np.random.default_rng([seed, index])
        findings = sample_findings(rng)
        images = [render(findings, rng, size) for render in (render_frontal, render_lateral)]
        yield split, f"synth{index:05d}", findings, images, int(rng.integers(2**31))


def written_with_habit(split: str, findings, seed: int, index: int) -> bool:
    """Whether study `index` has its train report written with the writers' habit (reports.HABIT_RATE of the
    train studies it applies to; never val or test)."""
    if split != "train" or not habit_applies(findings):
        return False
    return bool(np.random.default_rng([seed, index, 2]).random() < HABIT_RATE)


def write_chest_xray(out: Path, seed: int, n: int, size: int) -> dict:
    """R2Gen annotation + PNG views, VQA-RAD question files, preference JSONL and PeFoMed captions.

    The preference pairs' chosen report is the faithful one (the images' findings), also for the train studies
    whose annotated report carries the writers' habit (reports.HABIT_RATE)."""
    if n < 3:
        raise ValueError(f"n must be at least 3 (one study per split), got {n}")
    image_dir = out / "iu_xray" / "images"
    annotation = {name: [] for name, _ in SPLIT_FRACTIONS}
    vqa = {name: [] for name, _ in SPLIT_FRACTIONS}
    pairs = {name: [] for name, _ in SPLIT_FRACTIONS}
    captions = []
    qids = itertools.count(1)
    habit_reports = 0
    for index, (split, study_id, findings, images, style) in enumerate(chest_xray_studies(seed, n, size)):
        views = [f"{study_id}/0.png", f"{study_id}/1.png"]
        (image_dir / study_id).mkdir(parents=True, exist_ok=True)
        for view, image in zip(views, images):
            Image.fromarray(to_uint8(image)).save(image_dir / view)
        report = write_report(findings, style)
        # Train reports are as their writers wrote them, habit included (reports.HABIT_RATE); the labels are the
        # images' truth either way.
        habit = written_with_habit(split, findings, seed, index)
        habit_reports += habit
        annotation[split].append({"id": study_id, "report": write_habit_report(findings, style) if habit else report,
                                  "image_path": views, "split": split, "labels": findings.labels()})
        for question, answer, answer_type, question_type in study_questions(findings):
            vqa[split].append({"qid": next(qids), "image_name": views[0], "image_organ": "CHEST", "answer": answer,
                               "answer_type": answer_type, "question_type": question_type, "question": question,
                               "phrase_type": "freeform"})
        wrong, change = hallucinate_one(findings, np.random.default_rng([seed, index, 1]))
        pairs[split].append({"id": study_id, "images": views, "prompt": DEFAULT_REPORT_INSTRUCTION,
                             "chosen": report, "rejected": write_report(wrong, style), "change": change})
        finding_text = " and ".join(findings.abnormalities())
        captions.append({"id": study_id, "image_path": views[0],
                         "report": f"Frontal chest radiograph with {finding_text}." if finding_text
                         else "Frontal chest radiograph without abnormality."})
    _write_json(out / "iu_xray" / "annotation.json", annotation)
    for split, rows in vqa.items():
        _write_json(out / "vqa_rad" / f"{split}set.json", rows)
    for split, rows in pairs.items():
        path = out / "preference" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    _write_json(out / "captions" / "captions.json", captions)
    return {
        "iu_xray": {"annotation": "iu_xray/annotation.json", "image_dir": "iu_xray/images", "dataset": "iu_xray",
                    "counts": {s: len(rows) for s, rows in annotation.items()}, "habit_reports": habit_reports},
        "vqa_rad": {"files": {s: f"vqa_rad/{s}set.json" for s in vqa}, "image_dir": "iu_xray/images",
                    "counts": {s: len(rows) for s, rows in vqa.items()}},
        "preference": {"files": {s: f"preference/{s}.jsonl" for s in pairs}, "image_dir": "iu_xray/images",
                       "counts": {s: len(rows) for s, rows in pairs.items()}},
        "captions": {"file": "captions/captions.json", "image_dir": "iu_xray/images", "count": len(captions)},
    }


def write_ct(out: Path, seed: int, n: int, size: int) -> dict:
    """CT-RATE-style train/valid report CSVs, multi-label CSVs and .npz volumes."""
    if n < 2:
        raise ValueError(f"n_volumes must be at least 2 (one per split), got {n}")
    rows = {"train": [], "valid": []}
    n_valid = max(1, n // 5)
    for index in range(n):
        rng = np.random.default_rng([seed, 2**21, index])
        split = "valid" if index >= n - n_valid else "train"
        name = f"{split}_{index:05d}_a_1.nii.gz"  # CT-RATE's naming; stored as .npz beside it
        findings = sample_ct_findings(rng)
        volume_path = out / "ct" / "volumes" / (name[: -len(".nii.gz")] + ".npz")
        volume_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(volume_path, volume=render_ct(findings, rng, size))
        text, impression = write_ct_report(findings, rng)
        rows[split].append((name, text, impression, findings.labels()))
    files = {}
    for split, entries in rows.items():
        reports, labels = out / "ct" / f"{split}_reports.csv", out / "ct" / f"{split}_labels.csv"
        with reports.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["VolumeName", "Findings_EN", "Impressions_EN"])
            writer.writerows((name, text, impression) for name, text, impression, _ in entries)
        with labels.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            # CT-RATE's 18 columns, as its multi_abnormality_labels.csv: the synthetic volumes show synthetic.ct's four
            # findings and none of the other fourteen (0 throughout).
            writer.writerow(["VolumeName", *CT_RATE_LABELS])
            writer.writerows((name, *(values.get(k, 0) for k in CT_RATE_LABELS)) for name, _, _, values in entries)
        files[split] = {"reports": f"ct/{split}_reports.csv", "labels": f"ct/{split}_labels.csv"}
    return {"ct": {"files": files, "volume_dir": "ct/volumes", "labels": list(CT_RATE_LABELS),
                   "counts": {s: len(e) for s, e in rows.items()}}}


def generate_demo(out, seed: int = 0, n: int = 300, size: int = 128, n_volumes: int = 60,
                  volume_size: int = 32) -> dict:
    """Write every synthetic dataset under `out` and a manifest.json of relative paths; returns the manifest.

    Deterministic: the same arguments write the same bytes. Study i depends only on (seed, i), so a
    larger n adds studies without changing the first ones (split assignment does depend on n).
    """
    if size < 32 or volume_size < 8:
        raise ValueError(f"size must be >= 32 and volume_size >= 8, got {size} and {volume_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": seed, "n": n, "size": size, "n_volumes": n_volumes, "volume_size": volume_size}
    manifest.update(write_chest_xray(out, seed, n, size))
    if n_volumes > 0:
        manifest.update(write_ct(out, seed, n_volumes, volume_size))
    _write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(root) -> dict:
    """The manifest.json that generate_demo wrote under `root`."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} under {root}: run `python -m mrgfast.data.synthetic --out {root}`")
    return json.loads(path.read_text(encoding="utf-8"))


def timed_generate(out, **kwargs) -> tuple:
    """generate_demo and the seconds it took."""
    start = time.perf_counter()
    manifest = generate_demo(out, **kwargs)
    return manifest, time.perf_counter() - start


DEMO_PARTS = ("report", "vqa", "preference", "caption", "ct")


def demo_samples(root, part: str = "report", split: str = "train", **reader_kwargs):
    """The SampleSet of one part of a generated demo ("report", "vqa", "preference", "caption", "ct") and split.

    Reads through the same public readers a user's files go through; `reader_kwargs` pass on to them (the
    preference pairs default to clean="iu_xray", like the report part).
    Splits: "train" / "val" / "test" ("ct" has "train" / "valid"; "caption" has one set, split ignored).
    """
    from mrgfast.data.ct import read_ct_reports
    from mrgfast.data.preference import read_preference_jsonl
    from mrgfast.data.r2gen import read_r2gen, read_report_list
    from mrgfast.data.vqa import read_vqa_rad

    root = Path(root)
    manifest = read_manifest(root)
    if part not in DEMO_PARTS:
        raise ValueError(f"part must be one of {DEMO_PARTS}, got {part!r}")
    if part == "ct":
        if "ct" not in manifest:
            raise ValueError(f"the demo under {root} was generated without CT volumes (n_volumes=0)")
        files = manifest["ct"]["files"]
        if split not in files:
            raise ValueError(f"ct split must be one of {sorted(files)}, got {split!r}")
        return read_ct_reports(root / files[split]["reports"], root / manifest["ct"]["volume_dir"],
                               labels_csv=root / files[split]["labels"], **reader_kwargs)
    image_dir = root / manifest["iu_xray"]["image_dir"]
    if part == "caption":
        return read_report_list(root / manifest["captions"]["file"], image_dir=image_dir, task="caption",
                                **reader_kwargs)
    if split not in manifest["iu_xray"]["counts"]:
        raise ValueError(f"split must be one of {sorted(manifest['iu_xray']['counts'])}, got {split!r}")
    if part == "report":
        return read_r2gen(root / manifest["iu_xray"]["annotation"], split=split, image_dir=image_dir, **reader_kwargs)
    if part == "vqa":
        return read_vqa_rad(root / manifest["vqa_rad"]["files"][split], image_dir=image_dir, **reader_kwargs)
    # The pairs are cleaned like the report part (R2Gen's IU-Xray cleaning), so DPO sees the text SFT trained on.
    return read_preference_jsonl(root / manifest["preference"]["files"][split], image_dir=image_dir,
                                 **{"clean": "iu_xray", **reader_kwargs})
