"""Report templates for synthetic studies: varied phrasing, negations, one sentence per finding slot.

Each template list is ordered from the most to the least common phrasing, and a report draws its phrasings with
Zipf frequencies (option k of n with probability proportional to 1/k): real report corpora are written mostly in
a few stock phrases with a long tail of variants, not in every variant equally often.
"""

from dataclasses import replace
from typing import Callable

import numpy as np

from mrgfast.data.synthetic.findings import Findings

HEART_NORMAL = (
    "the heart size is normal", "heart size is within normal limits", "normal heart size",
    "the cardiac silhouette is normal in size", "the heart is not enlarged", "no cardiomegaly",
)
HEART_ENLARGED = (
    "the heart is enlarged", "cardiomegaly is present", "mild cardiomegaly", "there is cardiomegaly",
    "the cardiac silhouette is enlarged", "moderate enlargement of the cardiac silhouette",
)
EFFUSION_NONE = (
    "no pleural effusion", "there is no pleural effusion", "no evidence of pleural effusion",
    "pleural effusion is not seen", "the lungs are clear without pleural effusion",
)
EFFUSION_SIDE = (
    "small {side} pleural effusion", "there is a {side} pleural effusion", "{side} pleural effusion is present",
    "a moderate {side} pleural effusion is seen",
    "blunting of the {side} costophrenic angle consistent with a small effusion",
)
EFFUSION_BOTH = (
    "bilateral pleural effusions", "small bilateral pleural effusions", "pleural effusions are present bilaterally",
)
NODULE_NONE = (
    "no focal nodule", "no pulmonary nodules are seen", "there is no nodule or mass", "no suspicious pulmonary nodule",
)
NODULE_SIDE = (
    "a small nodule is seen in the {side} lung", "there is a {side} lung nodule", "{side} upper lobe nodule",
    "a {size} mm nodular opacity in the {side} mid lung", "a {size} mm nodule projects over the {side} lung",
)
PNEUMOTHORAX_NONE = (
    "no pneumothorax", "without evidence of pneumothorax", "there is no pneumothorax", "pneumothorax is not seen",
)
PLEURA_NONE = ("no pleural effusion or pneumothorax", "no pneumothorax or pleural effusion")
NORMAL_IMPRESSION = ("no acute cardiopulmonary abnormality", "no acute cardiopulmonary process", "normal chest")


def zipf_weights(n: int) -> np.ndarray:
    """Probabilities of n phrasings ordered from most to least common: proportional to 1, 1/2, ..., 1/n."""
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def _pick(options: tuple, slot_seed: int) -> str:
    """One option drawn with Zipf frequencies by a per-slot seed, so a report rebuilt with other findings keeps its
    other phrasings."""
    return options[int(np.random.default_rng(slot_seed).choice(len(options), p=zipf_weights(len(options))))]


def _sentence(text: str) -> str:
    """Capitalise and close with a full stop, as radiologists write."""
    return text[0].upper() + text[1:] + "."


def write_report(findings: Findings, seed: int, pick: Callable[[tuple, int], str] = _pick) -> str:
    """A report for `findings`; `seed` fixes the phrasing of every slot (same seed + other findings = same style).
    `pick(options, slot_seed)` chooses each sentence's template (mrgfast.demo.bleu_ceiling swaps in fixed choices)."""
    slots = np.random.default_rng(seed).integers(0, 2**31, size=8)
    sentences = [pick(HEART_ENLARGED if findings.cardiomegaly else HEART_NORMAL, slots[0])]
    if findings.nodule is not None:
        size = 4 + int(slots[2] % 9)
        sentences.append(pick(NODULE_SIDE, slots[1]).format(side=findings.nodule, size=size))
    else:
        sentences.append(pick(NODULE_NONE, slots[1]))
    combine_pleura = findings.effusion is None and slots[3] % 3 == 0
    if combine_pleura:
        sentences.append(pick(PLEURA_NONE, slots[4]))
    else:
        if findings.effusion == "both":
            sentences.append(pick(EFFUSION_BOTH, slots[5]))
        elif findings.effusion is not None:
            sentences.append(pick(EFFUSION_SIDE, slots[5]).format(side=findings.effusion))
        else:
            sentences.append(pick(EFFUSION_NONE, slots[5]))
        sentences.append(pick(PNEUMOTHORAX_NONE, slots[6]))
    if findings.normal and slots[7] % 2 == 0:
        sentences.append(pick(NORMAL_IMPRESSION, slots[7] // 2))
    return " ".join(_sentence(s) for s in sentences)


# The writers of the *train* split's reports have one habit the images do not support: half of the studies with an
# enlarged heart and no effusion are reported with small bilateral effusions (heart failure's usual company, written
# from the clinical picture rather than seen). Real report corpora teach models such statements (findings from the
# history, comparisons with prior exams), and suppressing them is what LDP's DPO is for. Labels, the preference
# pairs' chosen reports and the val/test references stay faithful to the images.
HABIT_RATE = 0.5
HABIT_PHRASE = "small bilateral pleural effusions"


def habit_applies(findings: Findings) -> bool:
    """Whether a habit writer would add effusions to this study's report: an enlarged heart and no effusion."""
    return findings.cardiomegaly and findings.effusion is None


def write_habit_report(findings: Findings, seed: int) -> str:
    """The report of a writer with the habit: write_report's, with HABIT_PHRASE in place of the effusion sentence."""
    if not habit_applies(findings):
        raise ValueError(f"the habit adds effusions to an enlarged heart without them, not to {findings}")
    return write_report(replace(findings, effusion="both"), seed,
                        pick=lambda options, slot: HABIT_PHRASE if options is EFFUSION_BOTH else _pick(options, slot))
