"""Reader for 3D CT report datasets in CT-RATE style: a reports CSV, a multi-label CSV, a folder of volumes."""

import csv
from pathlib import Path
from typing import Optional

from mrgfast.data.errors import BadSampleError, DataFormatError
from mrgfast.data.samples import Sample, SampleSet, collect_samples, prepare_text, resolve_path
from mrgfast.data.text import get_cleaner
from mrgfast.data.volumes import VOLUME_SUFFIXES

DEFAULT_CT_INSTRUCTION = "Write the findings of this chest CT scan."
# The 18 abnormality columns of CT-RATE's multi_abnormality_labels.csv, in file order.
CT_RATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)


def read_ct_reports(reports_csv, volume_dir, labels_csv=None, label_names: Optional[tuple] = None,
                    volume_column: str = "VolumeName", report_columns: tuple = ("Findings_EN",),
                    instruction: str = DEFAULT_CT_INSTRUCTION, clean=None, max_words: Optional[int] = None,
                    skip_bad_samples: bool = False, check_volumes: bool = True,
                    allow_outside: bool = False) -> SampleSet:
    """Read CT report rows into volume Samples, with multi-label targets from `labels_csv` when given.

    The report is the non-empty `report_columns` joined by a space. Volumes are looked up in volume_dir
    (recursively) by file name, or by the name's stem with any of .npy/.npz/.nii/.nii.gz, so CT-RATE's
    `*.nii.gz` names also find volumes converted to .npz. label_names defaults to every column of the
    labels file except `volume_column`; label values must be 0 or 1 (-1 is accepted as uncertain).
    """
    reports_csv, volume_dir = Path(reports_csv), Path(volume_dir)
    _, rows = _read_csv(reports_csv, (volume_column,) + tuple(report_columns))
    labels_by_volume, names = {}, None
    if labels_csv is not None:
        labels_by_volume, names = _read_labels(Path(labels_csv), volume_column, label_names)
    cleaner = get_cleaner(clean)
    index = _volume_index(volume_dir) if check_volumes else {}

    def build(where, row, stats):
        """One reports-CSV row -> volume Sample with its labels."""
        volume_name = (row[volume_column] or "").strip()
        if not volume_name:
            raise DataFormatError(f"{where}: column {volume_column!r} is empty")
        report = " ".join(row[c].strip() for c in report_columns if row[c] and row[c].strip())
        answer = prepare_text(report, cleaner, max_words, stats, "report", where, volume_name)
        labels = None
        if names is not None:
            if volume_name not in labels_by_volume:
                raise BadSampleError(f"{where} (id={volume_name}): no row for this volume in {labels_csv}",
                                     sample_id=volume_name, reason="missing_labels")
            labels = labels_by_volume[volume_name]
        path = _find_volume(volume_dir, volume_name, index, check_volumes, where, allow_outside)
        return Sample(id=volume_name, task="report", prompt=instruction, answer=answer, image_paths=(path,),
                      modality="volume", labels=labels, source=where)

    return collect_samples(((f"{reports_csv} row {n}", r) for n, r in rows), build, skip_bad_samples)


def _read_csv(path: Path, required: tuple) -> list:
    """(header, [(line number, row dict)]) of a CSV whose header must contain `required`."""
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {missing}; the header has {header}")
            rows = []
            for row in reader:
                if None in row:  # DictReader puts surplus cells under the key None
                    raise DataFormatError(f"{path} row {reader.line_num}: more cells than the "
                                          f"{len(header)} header columns")
                rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataFormatError(f"{path}: not a readable UTF-8 CSV file ({err})") from None
    return header, rows


def _read_labels(path: Path, volume_column: str, label_names: Optional[tuple]) -> tuple:
    """{volume name: {label: 1/0/-1}} and the label names, from a CT-RATE-style multi-label CSV."""
    header, rows = _read_csv(path, (volume_column,) + tuple(label_names or ()))
    names = tuple(label_names) if label_names is not None else tuple(c for c in header if c != volume_column)
    if not names:
        raise DataFormatError(f"{path}: no label columns besides {volume_column!r}")
    labels = {}
    for number, row in rows:
        values = {}
        for name in names:
            values[name] = _parse_label(row[name], f"{path} row {number} column {name!r}")
        labels[(row[volume_column] or "").strip()] = values
    return labels, names


def _parse_label(text: Optional[str], where: str) -> int:
    """A label cell ("1", "0", "1.0", "-1") as an int in {1, 0, -1}."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: expected 0 or 1, got {text!r}") from None
    if value not in (1.0, 0.0, -1.0):
        raise DataFormatError(f"{where}: expected 0 or 1 (or -1 for uncertain), got {text!r}")
    return int(value)


def _stem(name: str) -> str:
    """File name without its volume suffix (".nii.gz" counts as one suffix)."""
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _volume_index(volume_dir: Path) -> dict:
    """{file name: path} and {stem: path} for every volume file under volume_dir."""
    if not volume_dir.is_dir():
        raise FileNotFoundError(f"volume folder not found: {volume_dir}")
    index = {}
    for path in sorted(volume_dir.rglob("*")):
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            index.setdefault(path.name, path)
            index.setdefault(_stem(path.name), path)
    return index


def _find_volume(volume_dir: Path, name: str, index: dict, check: bool, where: str, allow_outside: bool) -> str:
    """The path of volume `name`: by exact file name, else by stem, among the files under volume_dir; missing raises
    naming the name. Unchecked, the name is joined to volume_dir and must stay inside it (samples.resolve_path)."""
    if not check:
        return resolve_path(volume_dir, name, where, name, False, allow_outside)
    found = index.get(name) or index.get(_stem(name))
    if found is None:
        raise BadSampleError(f"{where} (id={name}): volume file not found under {volume_dir} "
                             f"(looked for {name} and {_stem(name)} with {VOLUME_SUFFIXES})",
                             sample_id=name, path=str(volume_dir / name), reason="missing_image")
    return str(found)
