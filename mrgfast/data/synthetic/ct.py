"""Synthetic chest CT volumes in Hounsfield units with visible lesions and CT-RATE-style labels and reports."""

from dataclasses import dataclass
from typing import Optional

import numpy as np

CT_LABELS = ("Cardiomegaly", "Emphysema", "Lung nodule", "Pleural effusion")  # a subset of CT_RATE_LABELS
_LUNG_X = {"right": 0.3, "left": 0.7}  # axis 2 runs from the patient's right to left, as displayed


@dataclass(frozen=True)
class CTFindings:
    """Findings of one synthetic CT: sides are the patient's."""

    cardiomegaly: bool = False
    emphysema: bool = False
    nodule: Optional[str] = None    # None, "left" or "right"
    effusion: Optional[str] = None  # None, "left" or "right"

    def labels(self) -> dict:
        """Multi-label targets over CT_LABELS (1 present, 0 absent)."""
        return {"Cardiomegaly": int(self.cardiomegaly), "Emphysema": int(self.emphysema),
                "Lung nodule": int(self.nodule is not None), "Pleural effusion": int(self.effusion is not None)}


def sample_ct_findings(rng: np.random.Generator) -> CTFindings:
    """Draw CT findings, each present in roughly a third of volumes."""
    side = lambda: ("left", "right")[int(rng.integers(2))]  # noqa: E731 - a local shorthand
    return CTFindings(cardiomegaly=bool(rng.random() < 0.35), emphysema=bool(rng.random() < 0.3),
                      nodule=side() if rng.random() < 0.35 else None,
                      effusion=side() if rng.random() < 0.3 else None)


def render_ct(findings: CTFindings, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A [size, size, size] int16 HU volume (axis 0 head->feet, 1 anterior->posterior, 2 right->left)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    z, y, x = coords[:, None, None], coords[None, :, None], coords[None, None, :]
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - a local shorthand
    volume = np.full((size, size, size), -1000.0, dtype=np.float32)
    body = ((y - 0.5) / 0.42) ** 2 + ((x - 0.5) / 0.46) ** 2 <= 1.0
    volume = np.where(body, -80.0, volume)  # soft tissue and fat
    lung_cz, lung_rz = 0.45 + jitter(0.03), 0.33 + jitter(0.02)
    lungs = {}
    for side, cx in _LUNG_X.items():
        lungs[side] = (((z - lung_cz) / lung_rz) ** 2 + ((y - 0.52) / 0.3) ** 2
                       + ((x - cx - jitter(0.01)) / 0.17) ** 2) <= 1.0
        lung_hu = -950.0 if findings.emphysema else -830.0
        volume = np.where(lungs[side], lung_hu + jitter(20.0), volume)
    scale = 1.45 if findings.cardiomegaly else 1.0
    heart = (((z - 0.62) / 0.16) ** 2 + ((y - 0.36) / (0.13 * scale)) ** 2
             + ((x - 0.54) / (0.12 * scale)) ** 2) <= 1.0
    volume = np.where(heart, 45.0, volume)
    if findings.effusion is not None:
        # Fluid lies posteriorly (dependent) in the lower part of the lung.
        fluid = lungs[findings.effusion] & (y >= 0.66 + jitter(0.03)) & (z >= lung_cz) & ~heart
        volume = np.where(fluid, 12.0, volume)
    if findings.nodule is not None:
        centre = (lung_cz - 0.1 + jitter(0.05), 0.5 + jitter(0.05), _LUNG_X[findings.nodule] + jitter(0.03))
        radius = rng.uniform(0.06, 0.08)
        nodule = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2
        volume = np.where(nodule, 35.0, volume)
    volume = volume + rng.normal(0.0, 15.0, size=volume.shape)
    return np.clip(np.round(volume), -1024, 3071).astype(np.int16)


def write_ct_report(findings: CTFindings, rng: np.random.Generator) -> tuple:
    """(findings text, impression text) in the style of CT-RATE's Findings_EN / Impressions_EN."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731 - a local shorthand
    sentences, impressions = [], []
    if findings.cardiomegaly:
        sentences.append(pick(("The heart is enlarged.", "Cardiomegaly is present.", "Heart size is increased.")))
        impressions.append("Cardiomegaly.")
    else:
        sentences.append(pick(("Heart size is normal.", "The heart is not enlarged.", "No cardiomegaly.")))
    if findings.emphysema:
        sentences.append(pick(("Emphysematous changes are seen in both lungs.", "There is centrilobular emphysema.")))
        impressions.append("Emphysema.")
    else:
        sentences.append(pick(("No emphysema.", "Lung parenchyma shows normal attenuation.")))
    if findings.nodule is not None:
        size = int(rng.integers(5, 12))
        sentences.append(f"A {size} mm nodule is present in the {findings.nodule} lung.")
        impressions.append(f"{findings.nodule.capitalize()} lung nodule.")
    else:
        sentences.append(pick(("No pulmonary nodules.", "There is no pulmonary nodule.")))
    if findings.effusion is not None:
        sentences.append(pick((f"There is a {findings.effusion} pleural effusion.",
                               f"A small {findings.effusion} pleural effusion is seen.")))
        impressions.append(f"{findings.effusion.capitalize()} pleural effusion.")
    else:
        sentences.append(pick(("No pleural effusion.", "There is no pleural effusion.")))
    return " ".join(sentences), " ".join(impressions) or "No acute findings."
