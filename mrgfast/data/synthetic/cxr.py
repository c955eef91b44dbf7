"""Chest-X-ray-like 2D images whose findings are visible: heart width, basal fluid, a round opacity.

Frontal (PA) convention: the patient's right is on the image's left. Intensities are in [0, 1]
(bright = dense). Every anatomical size and position is jittered per study so that the findings, not
the exact pixels, are what a model has to learn.
"""

import numpy as np

from mrgfast.data.synthetic.findings import Findings

# Lung centres (x) on the frontal view: patient's right lung is on the image left.
LUNG_X = {"right": 0.31, "left": 0.69}
HEART_HALF_WIDTH = {False: (0.105, 0.125), True: (0.175, 0.2)}  # normal vs cardiomegaly, fraction of width


def _grid(size: int) -> tuple:
    """Normalised pixel-centre coordinates (y, x) in [0, 1]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[:, None], coords[None, :]


def _ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipse."""
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _smooth(image: np.ndarray, passes: int = 2) -> np.ndarray:
    """Cheap blur (repeated 3x3 box filter) so edges look like a projection, not a drawing."""
    for _ in range(passes):
        padded = np.pad(image, 1, mode="edge")
        image = sum(padded[dy:dy + image.shape[0], dx:dx + image.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    return image


def render_frontal(findings: Findings, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A frontal chest image [size, size] float32 in [0, 1] showing `findings`."""
    y, x = _grid(size)
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - a local shorthand
    image = np.full((size, size), 0.05, dtype=np.float32)
    body = _ellipse(y, x, 0.62 + jitter(0.02), 0.5, 0.62, 0.45 + jitter(0.02))
    image[body] = 0.55 + jitter(0.04)
    lung_ry, lung_rx, lung_cy = 0.3 + jitter(0.02), 0.14 + jitter(0.01), 0.47 + jitter(0.02)
    lungs = {}
    for side, cx in LUNG_X.items():
        lungs[side] = _ellipse(y, x, lung_cy, cx + jitter(0.015), lung_ry, lung_rx)
        # Ribs: faint horizontal bands across the dark lung field.
        ribs = 0.05 * (np.sin(2 * np.pi * (y * 11.0 + jitter(0.5))) > 0.6)
        image = np.where(lungs[side], 0.2 + ribs + jitter(0.02), image)
    spine = np.abs(x - 0.5) < 0.035
    image = np.where(spine & body, 0.72, image)
    # Heart: a bright ellipse low in the mediastinum, its centre shifted to the patient's left.
    half_width = rng.uniform(*HEART_HALF_WIDTH[findings.cardiomegaly])
    heart = _ellipse(y, x, lung_cy + 0.17 + jitter(0.015), 0.53 + jitter(0.01), 0.13 + jitter(0.01), half_width)
    image = np.where(heart, 0.78 + jitter(0.03), image)
    lung_bottom = lung_cy + lung_ry
    effusion_sides = {"left": ("left",), "right": ("right",), "both": ("left", "right")}.get(findings.effusion, ())
    for side in effusion_sides:
        # Fluid fills the lung base up to a meniscus that rises towards the chest wall.
        depth = rng.uniform(0.12, 0.2)
        lateral = np.abs(x - 0.5) / 0.5
        level = lung_bottom - depth - 0.06 * lateral
        fluid = lungs[side] & (y >= level) & ~heart
        image = np.where(fluid, 0.62 + jitter(0.03), image)
    if findings.nodule is not None:
        cx = LUNG_X[findings.nodule] + jitter(0.05)
        cy = lung_cy - 0.07 + jitter(0.07)  # mid/upper zone: clear of the heart and of basal fluid
        radius = rng.uniform(0.03, 0.04)
        distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        image = image + 0.45 * np.clip(1.0 - distance / radius, 0.0, 1.0) ** 0.5
    return _finish(image, rng)


def render_lateral(findings: Findings, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A lateral chest image: heart size and basal fluid are visible, sides are not (as on real laterals)."""
    y, x = _grid(size)
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - a local shorthand
    image = np.full((size, size), 0.05, dtype=np.float32)
    body = _ellipse(y, x, 0.6, 0.5, 0.6, 0.4 + jitter(0.02))
    image[body] = 0.55 + jitter(0.04)
    lung = _ellipse(y, x, 0.47 + jitter(0.02), 0.52, 0.3 + jitter(0.02), 0.26 + jitter(0.02))
    image = np.where(lung, 0.22 + jitter(0.02), image)
    image = np.where((np.abs(x - 0.84) < 0.04) & body, 0.72, image)  # spine, posterior
    half_width = rng.uniform(*HEART_HALF_WIDTH[findings.cardiomegaly])
    heart = _ellipse(y, x, 0.64 + jitter(0.015), 0.36, 0.13, half_width)
    image = np.where(heart, 0.78 + jitter(0.03), image)
    if findings.effusion is not None:
        level = 0.7 + rng.uniform(-0.03, 0.02) - (0.04 if findings.effusion == "both" else 0.0)
        image = np.where(lung & (y >= level) & (x > 0.5), 0.62, image)
    if findings.nodule is not None:
        distance = np.sqrt((y - 0.42 - jitter(0.1)) ** 2 + (x - 0.55 - jitter(0.1)) ** 2)
        image = image + 0.4 * np.clip(1.0 - distance / 0.03, 0.0, 1.0) ** 0.5
    return _finish(image, rng)


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, exposure variation and noise, clipped to [0, 1]."""
    image = _smooth(image)
    gain, offset = rng.uniform(0.9, 1.1), rng.uniform(-0.04, 0.04)
    image = image * gain + offset + rng.normal(0.0, 0.025, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image as 8-bit grayscale."""
    return np.round(image * 255.0).astype(np.uint8)
