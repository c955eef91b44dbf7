"""Rule-based CheXpert-style finding labeler: keyword mentions + negation/uncertainty scope -> 1 / 0 / -1 / None.

How it works, per report:
1. Split into sentences, then clauses (at "but", "however", ..., and at "," / "and" when a new clause
   starts, e.g. "no effusion, the heart is enlarged").
2. Mask pseudo-negations ("no change in ..."), then find cue phrases: uncertainty ("possible",
   "cannot exclude", "is not excluded") before negation ("no", "without", "is not seen"), so that
   "cannot exclude pneumothorax" is uncertain, not negative.
3. Find mentions of each observation by keyword; some observations also have phrases that state the
   normal case ("heart size is normal") or an uncertain one ("borderline heart size").
4. Each mention takes the nearest cue in its clause: the closest preceding cue, or the closest
   following post-cue ("effusion is not seen"), whichever is nearer. Uncertainty -> -1, negation -> 0,
   no cue -> 1.
5. Mentions are combined per observation as CheXpert does: any 1 -> 1, else any -1 -> -1, else 0;
   never mentioned -> None (blank). "No Finding" is 1 when no pathology is 1 or -1, else None.
Pleural effusion and lung lesions also get a side ("Left Pleural Effusion", ...) from the nearest
"left" / "right" / "bilateral" in the clause; an unsided negation ("no pleural effusion") negates both.

This is an approximation of the CheXpert labeler (which parses dependencies). For published
clinical-efficacy numbers on real data, run the CheXpert labeler or CheXbert on the reports and read
their output with `read_chexpert_csv`; the rest of mrgfast only needs {observation: 1/0/-1/None}.
"""

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from mrgfast.data.errors import DataFormatError

CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
# Sided observations derived from mentions of their parent.
LATERAL = {
    "Pleural Effusion": ("Left Pleural Effusion", "Right Pleural Effusion"),
    "Lung Lesion": ("Left Lung Lesion", "Right Lung Lesion"),
}
OBSERVATIONS = CHEXPERT_OBSERVATIONS + tuple(name for pair in LATERAL.values() for name in pair)

_SIZE = r"(?:(?:mildly|moderately|severely|markedly|slightly|minimally|again|now) )?"
_HEART = r"(?:heart|cardiac silhouette|cardiac shadow|heart size|cardiac size|heart shadow)"
_BE = r"(?: is| are| appears| remains| was)?"
_MEDIASTINUM = r"(?:cardiomediastinal|mediastinal) (?:silhouette|contours?|width)|(?:cardio)?mediastinum"

# observation -> mention phrases (the finding is named: present unless a cue says otherwise).
MENTIONS = {
    "Enlarged Cardiomediastinum": [
        r"(?:widened|widening of the|enlarged|enlargement of the) (?:cardio)?mediastin\w*",
        r"mediastinal widening", rf"(?:{_MEDIASTINUM}){_BE} {_SIZE}(?:widened|enlarged|prominent)",
    ],
    "Cardiomegaly": [
        r"cardiomegaly", rf"(?:enlarged|large) {_HEART}", rf"{_HEART}{_BE} {_SIZE}(?:enlarged|increased)",
        rf"enlargement of the {_HEART}", r"(?:heart|cardiac) enlargement",
    ],
    "Lung Lesion": [
        r"nodules?", r"nodular (?:opacity|opacities|density|densities)", r"mass(?:es)?", r"lesions?",
        r"tumou?rs?", r"neoplasms?", r"carcinomas?",
    ],
    "Lung Opacity": [
        r"(?<!nodular )opacit(?:y|ies)", r"opacification", r"infiltrates?", r"(?<!nodular )(?<!bone )densit(?:y|ies)",
        r"haziness", r"airspace disease", r"ground[- ]glass",
    ],
    "Edema": [r"edema", r"(?:pulmonary )?vascular congestion", r"heart failure", r"chf", r"fluid overload"],
    "Consolidation": [r"consolidations?", r"consolidative"],
    "Pneumonia": [r"(?:broncho)?pneumonias?", r"infection", r"infectious process"],
    "Atelectasis": [r"atelectas\w*", r"atelectatic", r"(?:lung|lobar|lobe) collapse", r"collapsed? (?:lung|lobe)"],
    "Pneumothorax": [r"pneumothora(?:x|ces|xes)", r"hydropneumothorax"],
    "Pleural Effusion": [
        r"(?<!pericardial )(?:pleural )?effusions?", r"pleural fluid", r"hydro(?:pneumo)?thorax",
        r"blunting of the (?:(?:left|right|bilateral) )?costophrenic angles?",
        r"blunted (?:(?:left|right|bilateral) )?costophrenic angles?",
    ],
    "Pleural Other": [r"pleural (?:thickening|plaques?|scarring|calcifications?)", r"fibrothorax"],
    "Fracture": [r"fractures?", r"fractured"],
    "Support Devices": [
        r"pacemaker", r"pacer", r"(?:endotracheal|et|nasogastric|ng|og|orogastric|feeding|chest|tracheostomy) tubes?",
        r"tracheostomy", r"(?:central venous|central|picc|port|swan-ganz|dialysis) (?:line|catheter)s?", r"picc",
        r"catheters?", r"sternotomy wires?", r"median sternotomy", r"surgical clips", r"a?icd", r"stents?",
        r"defibrillator", r"prosthe\w+",
    ],
}
# observation -> phrases that state the observation is absent / normal.
NORMAL = {
    "Enlarged Cardiomediastinum": [
        rf"(?:normal|unremarkable) (?:{_MEDIASTINUM})",
        rf"(?:{_MEDIASTINUM}){_BE} (?:normal|unremarkable|within normal limits|stable|not (?:widened|enlarged))",
    ],
    "Cardiomegaly": [
        rf"{_HEART}{_BE} (?:normal|within normal limits|unremarkable|not enlarged|normal in size|of normal size)",
        r"normal (?:heart|cardiac) (?:size|silhouette|contours?)", r"normal[- ]sized? heart",
    ],
}
# observation -> phrases that state the observation is uncertain.
UNCERTAIN = {
    "Cardiomegaly": [
        rf"{_HEART}{_BE} (?:at the )?(?:upper limits? of normal|upper (?:limits? )?normal|top normal|borderline)",
        rf"borderline (?:{_HEART}|enlarged heart)",
    ],
}

_PSEUDO_NEGATION = [
    r"no (?:significant |substantial |interval |definite )?change", r"not (?:significantly )?changed",
    r"no (?:further |significant )?(?:increase|decrease|progression)", r"gram[- ]negative",
]
_UNCERTAIN_PRE = [
    r"cannot (?:be )?(?:excluded?|ruled out)", r"can ?not (?:be )?(?:excluded?|ruled out)", r"cannot rule out",
    r"rule out", r"r/o", r"possibl[ey]", r"probabl[ey]", r"likely", r"questionable", r"question of",
    r"suspicious for", r"suspected", r"suspicion (?:of|for)", r"suggestive of", r"suggests?", r"suggesting",
    r"concerning for", r"concern for", r"worrisome for", r"may", r"might", r"could", r"differential",
    r"versus", r"vs", r"equivocal", r"indeterminate", r"borderline", r"presumed", r"consider(?:ed)?",
    r"not (?:entirely )?excluded",
]
_UNCERTAIN_POST = [
    r"(?:is |are )?(?:not|cannot be|can not be|can't be) (?:entirely )?(?:excluded|ruled out)",
    r"(?:is|are) (?:possible|possibly present|suspected|questionable|likely|not excluded)",
    r"may be present",
]
_NEGATION_PRE = [
    r"no", r"not", r"without", r"negative for", r"free of", r"absence of", r"absent", r"resolution of",
    r"resolved", r"clear of", r"rather than", r"neither", r"nor", r"ruled out",
]
_NEGATION_POST = [
    r"(?:is |are |was |were |has been |have been )?(?:not|no longer) (?:clearly )?"
    r"(?:seen|identified|present|visualized|visible|appreciated|evident|demonstrated|noted|detected)",
    r"(?:is |are |has |have )?(?:absent|resolved|cleared)", r"(?:is |are )?ruled out", r"(?:is |are )?excluded",
]
_CLAUSE_WORDS = r"\b(?:but|however|although|though|whereas|yet|except|otherwise)\b"
# "," / "and" start a new clause only when a new subject or modifier follows ("no effusion, the heart ...");
# in lists ("no effusion, pneumothorax, or consolidation") the negation carries on.
_NEW_CLAUSE = (r"(?:,|\band\b)\s+(?=(?:the|there|a|an|this|these|it|which|mild|mildly|moderate|moderately|severe|"
               r"severely|marked|markedly|small|large|new|stable|minimal|trace|unchanged|persistent|increased|"
               r"decreased|improved|worsening|heart|cardiac|lungs?)\b)")
_SENTENCE = r"(?<!\d)\.(?!\d)|[;:!?\n]"
_SIDE = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b")


def _compile(phrases: Iterable[str]) -> re.Pattern:
    """One regex matching any phrase as whole words."""
    return re.compile(r"\b(?:" + "|".join(phrases) + r")\b")


_MENTION_RE = {name: _compile(p) for name, p in MENTIONS.items()}
_NORMAL_RE = {name: _compile(p) for name, p in NORMAL.items()}
_UNCERTAIN_RE = {name: _compile(p) for name, p in UNCERTAIN.items()}
_PSEUDO_RE = _compile(_PSEUDO_NEGATION)
_CUES = (("uncertain_post", _compile(_UNCERTAIN_POST)), ("uncertain", _compile(_UNCERTAIN_PRE)),
         ("negation_post", _compile(_NEGATION_POST)), ("negation", _compile(_NEGATION_PRE)))


@dataclass(frozen=True)
class Mention:
    """One mention of an observation: its value (1/0/-1), side ("left"/"right"/"both"/None) and text."""

    observation: str
    value: int
    side: Optional[str]
    text: str


def _mask(text: str, start: int, end: int) -> str:
    """`text` with [start, end) blanked out, positions kept."""
    return text[:start] + "#" * (end - start) + text[end:]


def _clauses(report: str) -> list:
    """Lowercased clauses of a report (sentences split at clause boundaries)."""
    clauses = []
    for sentence in re.split(_SENTENCE, report.lower()):
        for part in re.split(_CLAUSE_WORDS, sentence):
            for clause in re.split(_NEW_CLAUSE, part):
                if clause.strip():
                    clauses.append(" ".join(clause.split()))
    return clauses


def _find_cues(clause: str) -> list:
    """(kind, start, end) of every cue; uncertainty first so its words are not read again as negation."""
    text = clause
    for match in _PSEUDO_RE.finditer(text):
        text = _mask(text, *match.span())
    cues = []
    for kind, pattern in _CUES:
        for match in pattern.finditer(text):
            cues.append((kind, match.start(), match.end()))
            text = _mask(text, *match.span())
    return cues


def _value(start: int, end: int, cues: list) -> int:
    """1 / 0 / -1 for a mention at [start, end) from the nearest governing cue."""
    before = [c for c in cues if not c[0].endswith("_post") and c[2] <= start]
    pre = max(before, key=lambda c: c[2], default=None)
    after = [c for c in cues if c[0].endswith("_post") and c[1] >= end
             and not any(b[1] >= end and b[2] <= c[1] and not b[0].endswith("_post") for b in cues)]
    post = min(after, key=lambda c: c[1], default=None)
    chosen = pre
    if post is not None and (pre is None or post[1] - end < start - pre[2]):
        chosen = post
    if chosen is None:
        return 1
    return -1 if chosen[0].startswith("uncertain") else 0


def _side(clause: str, start: int, end: int) -> Optional[str]:
    """Side named nearest to the mention in its clause: "left", "right", "both" or None."""
    best, best_distance = None, None
    for match in _SIDE.finditer(clause):
        distance = 0 if start <= match.start() < end else min(abs(match.end() - start), abs(match.start() - end))
        if best_distance is None or distance < best_distance:
            best, best_distance = match.group(1), distance
    return {"bilateral": "both", "bilaterally": "both"}.get(best, best)


def find_mentions(report: str) -> list:
    """Every observation mention in `report`, with its value and side (the labeler's evidence)."""
    mentions = []
    for clause in _clauses(report):
        cues = _find_cues(clause)
        for name in MENTIONS:
            text = clause
            for table, fixed in ((_NORMAL_RE, 0), (_UNCERTAIN_RE, -1)):
                if name in table:
                    for match in table[name].finditer(text):
                        mentions.append(Mention(name, fixed, _side(clause, *match.span()), match.group(0)))
                        text = _mask(text, *match.span())
            for match in _MENTION_RE[name].finditer(text):
                value = _value(match.start(), match.end(), cues)
                mentions.append(Mention(name, value, _side(clause, *match.span()), match.group(0)))
    return mentions


def _combine(values: list) -> Optional[int]:
    """CheXpert's rule: any positive -> 1, else any uncertain -> -1, else negative -> 0, none -> None."""
    if not values:
        return None
    if 1 in values:
        return 1
    return -1 if -1 in values else 0


def label_report(report: str) -> dict:
    """{observation: 1, 0, -1 or None} for the CheXpert 14 observations plus the sided ones in LATERAL."""
    if not isinstance(report, str):
        raise TypeError(f"label_report expects a report string, got {type(report).__name__}")
    values = {name: [] for name in OBSERVATIONS}
    for mention in find_mentions(report):
        values[mention.observation].append(mention.value)
        if mention.observation in LATERAL:
            left, right = LATERAL[mention.observation]
            # An unsided negation ("no pleural effusion") speaks for both sides; an unsided positive for neither.
            sides = {"left": (left,), "right": (right,), "both": (left, right)}.get(
                mention.side, (left, right) if mention.value == 0 else ())
            for name in sides:
                values[name].append(mention.value)
    labels = {name: _combine(v) for name, v in values.items()}
    pathologies = [n for n in CHEXPERT_OBSERVATIONS if n not in ("No Finding", "Support Devices")]
    labels["No Finding"] = None if any(labels[n] in (1, -1) for n in pathologies) else 1
    return labels


def binarize(labels: dict, names: Iterable[str] = CHEXPERT_OBSERVATIONS, uncertain: int = 0,
             blank: int = 0) -> list:
    """Labels as a 0/1 vector over `names`; uncertain and blank map to `uncertain` / `blank`.

    R2Gen-style clinical efficacy counts uncertain as negative (the defaults).
    """
    out = []
    for name in names:
        value = labels.get(name)
        out.append(blank if value is None else uncertain if value == -1 else int(value))
    return out


def read_chexpert_csv(path, report_column: Optional[str] = None) -> list:
    """Read a CheXpert-labeler or CheXbert output CSV into [(report, {observation: 1/0/-1/None})].

    Cells are "1.0" / "0.0" / "-1.0" / "" (blank). The report column is "Reports" (CheXpert labeler) or
    "Report Impression" (CheXbert) unless named; observation columns are the CheXpert 14 present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labeler CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if report_column is None:
            report_column = next((c for c in ("Reports", "Report Impression") if c in header), None)
        if report_column is None or report_column not in header:
            raise DataFormatError(f"{path}: no report column ('Reports' or 'Report Impression', or the one named); "
                                  f"header is {header}")
        names = [n for n in CHEXPERT_OBSERVATIONS if n in header]
        if not names:
            raise DataFormatError(f"{path}: none of the CheXpert observation columns {list(CHEXPERT_OBSERVATIONS)}")
        rows = []
        for row in reader:
            labels = {n: _cell(row[n], f"{path} row {reader.line_num} column {n!r}") for n in names}
            rows.append((row[report_column], labels))
    return rows


def _cell(text: Optional[str], where: str) -> Optional[int]:
    """A labeler CSV cell as 1 / 0 / -1 / None."""
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{where}: expected 1, 0, -1 or blank, got {text!r}") from None
    if value not in (1.0, 0.0, -1.0):
        raise DataFormatError(f"{where}: expected 1, 0, -1 or blank, got {text!r}")
    return int(value)
