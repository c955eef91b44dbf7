"""A torch Dataset over Samples: loads and preprocesses images or volumes, never fails without naming the sample."""

import warnings
from collections import Counter
from typing import Optional

import numpy as np
import torch

from mrgfast.data.errors import BadSampleError
from mrgfast.data.images import ImageConfig, load_image, preprocess_image
from mrgfast.data.samples import Sample
from mrgfast.data.volumes import VolumeConfig, load_volume, preprocess_volume


class MedicalDataset(torch.utils.data.Dataset):
    """Samples -> dicts with `pixel_values` and the texts a collator needs.

    Each item: {"id", "task", "prompt", "answer", "pixel_values", "modality", "index"} plus "rejected",
    "labels" (a dict) and "answer_type" when the sample has them. pixel_values is [views, C, H, W] for
    images and [1, D, H, W] for volumes.

    A sample that fails to load raises BadSampleError naming its index, id, source entry and path; with
    `skip_bad_samples=True` it is counted in `stats` (key "skipped_<reason>"), reported with a warning,
    and the next loadable sample is returned instead, so an epoch never dies on one bad file. With
    DataLoader workers those counts live in the worker processes: call `check()` first to find and count
    bad files in the main process. `stats` starts from the reader's counts (truncations, skips).
    """

    def __init__(self, samples, image_config: Optional[ImageConfig] = None,
                 volume_config: Optional[VolumeConfig] = None, skip_bad_samples: bool = False, seed: int = 0):
        self.samples = list(samples)
        for index, sample in enumerate(self.samples):
            if not isinstance(sample, Sample):
                raise TypeError(f"samples[{index}] must be a Sample, got {type(sample).__name__}")
        self.image_config = image_config if image_config is not None else ImageConfig()
        self.volume_config = volume_config if volume_config is not None else VolumeConfig()
        self.skip_bad_samples = skip_bad_samples
        self.seed = seed
        self.epoch = 0
        self.stats = Counter(getattr(samples, "stats", {}))
        self.bad = {}  # index -> error message of samples skipped so far

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def media_config(self):
        """How its samples' media are loaded: the VolumeConfig for CT volumes, else the ImageConfig."""
        volumes = bool(self.samples) and self.samples[0].modality == "volume"
        return self.volume_config if volumes else self.image_config

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw for a new epoch (augmentation stays a function of seed, epoch, index)."""
        self.epoch = epoch

    def load(self, index: int) -> dict:
        """Load sample `index` or raise BadSampleError naming it; no skipping."""
        sample = self.samples[index]
        try:
            pixels = self._pixels(sample, index)
        except Exception as err:  # any failure must name the sample, not just the file or the op
            path = getattr(err, "path", "")
            reason = getattr(err, "reason", "bad_sample")
            raise BadSampleError(f"sample {index} (id={sample.id}, from {sample.source or 'memory'}) failed to load: "
                                 f"{err}", sample_id=sample.id, path=path, reason=reason) from err
        item = {"id": sample.id, "task": sample.task, "prompt": sample.prompt, "answer": sample.answer,
                "pixel_values": pixels, "modality": sample.modality, "index": index}
        for key in ("rejected", "labels", "answer_type"):
            value = getattr(sample, key)
            if value is not None:
                item[key] = value
        return item

    def __getitem__(self, index: int) -> dict:
        if not self.skip_bad_samples:
            return self.load(index)
        for attempt in range(len(self.samples)):
            candidate = (index + attempt) % len(self.samples)
            if candidate in self.bad:
                continue
            try:
                return self.load(candidate)
            except BadSampleError as err:
                self._count_bad(candidate, err)
        raise BadSampleError(f"every one of the {len(self.samples)} samples failed to load", reason="all_bad")

    def check(self) -> "MedicalDataset":
        """Load every sample once; bad ones raise, or (skip_bad_samples) are counted and dropped. Returns self."""
        kept = []
        for index, sample in enumerate(self.samples):
            try:
                self.load(index)
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self._count_bad(index, err)
                continue
            kept.append(sample)
        self.samples = kept
        self.bad = {}  # indices changed: the dropped samples are gone
        self.stats["kept"] = len(kept)
        return self

    def _count_bad(self, index: int, err: BadSampleError) -> None:
        """Count a bad sample once and warn with its name."""
        self.bad[index] = str(err)
        self.stats[f"skipped_{err.reason}"] += 1
        warnings.warn(f"skipping bad sample: {err}", stacklevel=3)

    def _pixels(self, sample: Sample, index: int) -> torch.Tensor:
        """The sample's preprocessed image views [V, C, H, W] or volume [1, D, H, W]."""
        if not sample.image_paths:
            raise BadSampleError(f"sample {sample.id} has no image paths", sample_id=sample.id, reason="no_image")
        if sample.modality == "volume":
            return preprocess_volume(load_volume(sample.image_paths[0]), self.volume_config)
        rng = None
        if self.image_config.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
        views = [preprocess_image(load_image(p, self.image_config.channels), self.image_config, rng)
                 for p in sample.image_paths]
        return torch.stack(views)
