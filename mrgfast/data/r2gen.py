"""Readers for report datasets: R2Gen `annotation.json` (IU-Xray, MIMIC-CXR) and PeFoMed-style lists."""

from pathlib import Path
from typing import Optional

from mrgfast.data.errors import DataFormatError
from mrgfast.data.jsonio import get_field, load_json, load_json_list
from mrgfast.data.samples import Sample, SampleSet, collect_samples, prepare_text, resolve_path
from mrgfast.data.text import get_cleaner

DEFAULT_REPORT_INSTRUCTION = "Describe the given chest x-ray image in detail."
# R2Gen's max_seq_length per dataset (words of the cleaned report); PeFoMed cuts reports to 50 words.
R2GEN_MAX_WORDS = {"iu_xray": 60, "mimic_cxr": 100}
PEFOMED_MAX_WORDS = 50
# IU-Xray entries stack both views (frontal, lateral); MIMIC-CXR entries use the first image only.
R2GEN_VIEWS = {"iu_xray": 2, "mimic_cxr": 1}
R2GEN_FIELDS = ("id", "report", "image_path")
_DEFAULT = "default"


def read_r2gen(annotation, split: str = "train", dataset: str = "iu_xray", image_dir=None, clean=_DEFAULT,
               max_words=_DEFAULT, instruction: str = DEFAULT_REPORT_INSTRUCTION, skip_bad_samples: bool = False,
               check_images: bool = True, allow_outside: bool = False) -> SampleSet:
    """Read one split of an R2Gen annotation.json into report Samples.

    dataset: "iu_xray" (both views per entry) or "mimic_cxr" (first view). image_dir defaults to the
    folder `images/` beside the annotation file. clean: "default" (R2Gen's cleaner for the dataset),
    "iu_xray", "mimic_cxr", "pefomed", "none" or a callable. max_words: "default" (60 IU / 100 MIMIC,
    R2Gen's max_seq_length), an int or None; longer reports are cut and counted in `stats`.
    An optional "labels" object per entry ({finding: 1/0/-1}) is passed through. An image path outside image_dir
    is an error unless `allow_outside` (samples.resolve_path).
    """
    if dataset not in R2GEN_VIEWS:
        raise ValueError(f"dataset must be one of {sorted(R2GEN_VIEWS)}, got {dataset!r}")
    path = Path(annotation)
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected an object {{'train': [...], 'val': [...], 'test': [...]}}, "
                              f"got {type(data).__name__}")
    if split not in data:
        raise DataFormatError(f"{path}: no split {split!r}; the file has {sorted(data)}")
    entries = data[split]
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}[{split}]: expected a list of entries, got {type(entries).__name__}")
    image_dir = path.parent / "images" if image_dir is None else Path(image_dir)
    cleaner = get_cleaner(dataset if clean == _DEFAULT else clean)
    budget = R2GEN_MAX_WORDS[dataset] if max_words == _DEFAULT else max_words
    views = R2GEN_VIEWS[dataset]

    def build(where, entry, stats):
        """One annotation entry -> Sample (cleaned, truncated, image paths checked)."""
        sample_id = str(get_field(entry, "id", (str, int), where, R2GEN_FIELDS))
        report = get_field(entry, "report", str, where, R2GEN_FIELDS)
        paths = get_field(entry, "image_path", list, where, R2GEN_FIELDS)
        if len(paths) < views or not all(isinstance(p, str) for p in paths[:views]):
            raise DataFormatError(f"{where} (id={sample_id}): 'image_path' must list at least {views} path "
                                  f"string(s) for {dataset}, got {paths!r}")
        answer = prepare_text(report, cleaner, budget, stats, "report", where, sample_id)
        images = tuple(resolve_path(image_dir, p, where, sample_id, check_images, allow_outside)
                       for p in paths[:views])
        return Sample(id=sample_id, task="report", prompt=instruction, answer=answer, image_paths=images,
                      labels=read_labels(entry, where), split=split, source=where)

    return collect_samples(((f"{path}[{split}][{i}]", e) for i, e in enumerate(entries)), build, skip_bad_samples)


def read_report_list(path, image_dir=None, clean="pefomed", max_words: Optional[int] = PEFOMED_MAX_WORDS,
                     instruction: str = DEFAULT_REPORT_INSTRUCTION, task: str = "report",
                     skip_bad_samples: bool = False, check_images: bool = True,
                     allow_outside: bool = False) -> SampleSet:
    """Read a PeFoMed-style JSON list of {"image_path": str, "report": str} (optional "id") into Samples.

    Defaults follow PeFoMed: its text processing (lowercase, BLIP punctuation set) and 50 words.
    image_dir defaults to the annotation file's folder. task: "report" or "caption" (stage-1 captions).
    """
    path = Path(path)
    data = load_json_list(path, "{'image_path', 'report'} entries")
    image_dir = path.parent if image_dir is None else Path(image_dir)
    cleaner = get_cleaner(clean)
    fields = ("image_path", "report")

    def build(where, entry, stats):
        """One list entry -> Sample."""
        image = get_field(entry, "image_path", str, where, fields)
        sample_id = str(entry.get("id", image))
        report = get_field(entry, "report", str, where, fields)
        answer = prepare_text(report, cleaner, max_words, stats, "report", where, sample_id)
        return Sample(id=sample_id, task=task, prompt=instruction, answer=answer,
                      image_paths=(resolve_path(image_dir, image, where, sample_id, check_images, allow_outside),),
                      labels=read_labels(entry, where), source=where)

    return collect_samples(((f"{path}[{i}]", e) for i, e in enumerate(data)), build, skip_bad_samples)


def read_labels(entry: dict, where: str) -> Optional[dict]:
    """The optional "labels" field: {finding name: 1, 0, -1 or null}, checked."""
    labels = entry.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise DataFormatError(f"{where}: 'labels' must map finding names to 1/0/-1/null, got {labels!r}")
    for name, value in labels.items():
        if value not in (1, 0, -1, None) or isinstance(value, bool):
            raise DataFormatError(f"{where}: label {name!r} must be 1, 0, -1 or null, got {value!r}")
    return dict(labels)
