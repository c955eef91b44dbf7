"""Synthetic study findings: what each synthetic chest image shows, sampled from a seed."""

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

SIDES = ("left", "right")
EFFUSION_SIDES = ("left", "right", "both")


@dataclass(frozen=True)
class Findings:
    """The findings of one synthetic study. Sides are the patient's (left = image right on a frontal view)."""

    cardiomegaly: bool = False
    effusion: Optional[str] = None  # None, "left", "right" or "both"
    nodule: Optional[str] = None    # None, "left" or "right"

    def __post_init__(self):
        if self.effusion not in (None,) + EFFUSION_SIDES:
            raise ValueError(f"Findings.effusion must be None or one of {EFFUSION_SIDES}, got {self.effusion!r}")
        if self.nodule not in (None,) + SIDES:
            raise ValueError(f"Findings.nodule must be None or one of {SIDES}, got {self.nodule!r}")

    @property
    def normal(self) -> bool:
        """No finding at all."""
        return not self.cardiomegaly and self.effusion is None and self.nodule is None

    def labels(self) -> dict:
        """Ground truth in the labeler's observation names (1 present, 0 absent)."""
        effusion_sides = {"left": ("left",), "right": ("right",), "both": ("left", "right")}.get(self.effusion, ())
        return {
            "No Finding": 1 if self.normal else 0,
            "Cardiomegaly": int(self.cardiomegaly),
            "Pleural Effusion": int(self.effusion is not None),
            "Left Pleural Effusion": int("left" in effusion_sides),
            "Right Pleural Effusion": int("right" in effusion_sides),
            "Lung Lesion": int(self.nodule is not None),
            "Left Lung Lesion": int(self.nodule == "left"),
            "Right Lung Lesion": int(self.nodule == "right"),
            "Pneumothorax": 0,
        }

    def abnormalities(self) -> list:
        """Names of the findings present, in a fixed order ("cardiomegaly", "left pleural effusion", ...)."""
        names = []
        if self.cardiomegaly:
            names.append("cardiomegaly")
        if self.effusion == "both":
            names.append("bilateral pleural effusions")
        elif self.effusion is not None:
            names.append(f"{self.effusion} pleural effusion")
        if self.nodule is not None:
            names.append(f"{self.nodule} lung nodule")
        return names


def sample_findings(rng: np.random.Generator) -> Findings:
    """Draw findings: about a third of studies normal, each finding otherwise independent."""
    if rng.random() < 0.3:
        return Findings()
    effusion = None
    if rng.random() < 0.45:
        effusion = EFFUSION_SIDES[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
    nodule = SIDES[int(rng.integers(2))] if rng.random() < 0.35 else None
    return Findings(cardiomegaly=bool(rng.random() < 0.45), effusion=effusion, nodule=nodule)


def hallucinate_one(findings: Findings, rng: np.random.Generator) -> tuple:
    """(wrong findings, description): one hallucination injected into the true findings, chosen uniformly among
    those the study allows: a finding it lacks asserted, or a one-sided finding moved to the other side.

    This is how hallucination-targeted preference data is built (POVID injects plausible hallucinations into the
    ground truth): a rejected report that merely omits a finding would teach DPO to assert more, the opposite of
    what LDP's DPO is for.
    """
    options = []
    if not findings.cardiomegaly:
        options.append((replace(findings, cardiomegaly=True), "cardiomegaly hallucinated"))
    for name, sides in (("effusion", EFFUSION_SIDES), ("nodule", SIDES)):
        present = getattr(findings, name)
        if present is None:
            side = sides[int(rng.integers(len(sides)))]
            where = "bilateral" if side == "both" else side
            options.append((replace(findings, **{name: side}), f"{where} {name} hallucinated"))
        elif present in SIDES:
            other = "right" if present == "left" else "left"
            options.append((replace(findings, **{name: other}), f"{name} side swapped to {other}"))
    # Never empty: the nodule is either absent (hallucinate it) or one-sided (move it).
    return options[int(rng.integers(len(options)))]
