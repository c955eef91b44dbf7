"""Image loading with Pillow and the vision tower's preprocessing: resize, normalise, optional augmentation."""

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mrgfast.data.errors import BadSampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # EVA-CLIP / OpenAI CLIP, used by PeFoMed
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class ImageConfig:
    """How images become tensors: square `size`, `channels` (3 = RGB, 1 = gray), mean/std, augmentation.

    Augmentation (`augment=True`, training only) is a random resized crop of at least `min_scale` of the
    area and a brightness/contrast jitter. There is no horizontal flip on purpose: it would swap the
    patient's left and right, which the reports and labels name.
    """

    size: int = 448
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    channels: int = 3
    resample: str = "bicubic"
    augment: bool = False
    min_scale: float = 0.8
    jitter: float = 0.1

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"ImageConfig.size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"ImageConfig.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"ImageConfig.mean and .std need {self.channels} values each, "
                             f"got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageConfig.std must be positive, got {self.std}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"ImageConfig.resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"ImageConfig.min_scale must be in (0, 1], got {self.min_scale}")


def load_image(path, channels: int = 3) -> Image.Image:
    """Open an image file as RGB (channels=3) or grayscale (1); a missing or corrupt file names the path."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not inside the collator
            return image.convert("RGB" if channels == 3 else "L")
    except FileNotFoundError:
        raise BadSampleError(f"image file not found: {path}", path=str(path), reason="missing_image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"cannot decode image {path}: {err}", path=str(path), reason="corrupt_image") from None


def _random_crop_box(width: int, height: int, min_scale: float, rng: np.random.Generator) -> tuple:
    """A crop box covering a random fraction in [min_scale, 1] of the area, aspect kept."""
    scale = rng.uniform(min_scale, 1.0)
    crop_w, crop_h = max(1, round(width * scale ** 0.5)), max(1, round(height * scale ** 0.5))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return left, top, left + crop_w, top + crop_h


def preprocess_image(image: Image.Image, config: ImageConfig,
                     rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """PIL image -> float32 tensor [channels, size, size], normalised; augmented only if config.augment."""
    if config.augment and rng is None:
        raise ValueError("preprocess_image: config.augment=True needs an rng (np.random.Generator)")
    image = image.convert("RGB" if config.channels == 3 else "L")
    if config.augment:
        image = image.crop(_random_crop_box(image.width, image.height, config.min_scale, rng))
    image = image.resize((config.size, config.size), _RESAMPLE[config.resample])
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if config.augment and config.jitter > 0:
        contrast = 1.0 + rng.uniform(-config.jitter, config.jitter)
        brightness = rng.uniform(-config.jitter, config.jitter)
        array = np.clip((array - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
