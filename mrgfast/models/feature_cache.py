"""FeatureCache: a frozen vision encoder's features computed once per image and reused, in memory or on disk.

An entry is keyed by the image's content (sha256 of dtype, shape and bytes) under the encoder's fingerprint
(sha256 of its module tree, settings and weights), so a different tower, other weights or other settings never
read another's features. Only frozen encoders are cached, and only without image augmentation: a trainable
tower's features change every step, an augmented image is a new image every epoch.
"""

import hashlib
import json
import os
import weakref
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mrgfast.common.files import atomic_write
from mrgfast.models.vision import VisionFeatures

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB of features kept in memory


def tensor_digest(tensor: Tensor) -> str:
    """sha256 hex of a tensor's dtype, shape and bytes (row-major, on the CPU)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 hex of an encoder's class, module tree (with each module's settings, as print shows them) and every
    state_dict tensor: equal only for the same architecture, options and weights."""
    digest = hashlib.sha256(f"{type(encoder).__module__}.{type(encoder).__qualname__}\n{encoder!r}\n".encode())
    for name, value in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_digest(value).encode())
    return digest.hexdigest()


def check_no_augmentation(image_config) -> None:
    """ValueError when an ImageConfig / VolumeConfig augments: cached features would freeze one random draw."""
    if getattr(image_config, "augment", False):
        raise ValueError(f"{type(image_config).__name__}(augment=True): augmented images differ every epoch, so their "
                         "features cannot be cached; turn augmentation off or drop the feature cache")


class FeatureCache:
    """Per-image VisionFeatures of a frozen encoder: an LRU in memory bounded by `max_bytes` (0 disables it),
    and, with `directory`, safetensors files `<directory>/<encoder fingerprint>/<image digest>.safetensors` that
    outlive the process. `device`: where memory entries live (None: where the encoder computed them).
    `stats` counts hits (memory), disk_hits and misses.
    """

    def __init__(self, directory: Union[str, os.PathLike, None] = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 device: Union[str, torch.device, None] = None, fingerprint: Optional[str] = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint.isalnum()):
            raise ValueError(f"fingerprint must be an alphanumeric string (it names a directory), got {fingerprint!r}")
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes, self.device, self.fixed_fingerprint = max_bytes, device, fingerprint
        self.memory: OrderedDict = OrderedDict()
        self.bytes = 0
        self.stats = Counter(hits=0, disk_hits=0, misses=0)
        self._fingerprints = weakref.WeakKeyDictionary()  # hashing the weights once per encoder object

    @property
    def hits(self) -> int:
        """Images served from the cache (memory or disk)."""
        return self.stats["hits"] + self.stats["disk_hits"]

    def check_encoder(self, encoder: nn.Module) -> None:
        """ValueError unless the encoder is frozen (no trainable parameter, not unfrozen on purpose)."""
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if getattr(encoder, "frozen", True) is False or trainable:
            shown = ", ".join(trainable[:3]) + (" ..." if len(trainable) > 3 else "")
            raise ValueError(f"FeatureCache: {type(encoder).__name__} is trainable ({shown or 'frozen=False'}); only a "
                             "frozen encoder's features can be cached (freeze it or drop the cache)")

    def fingerprint(self, encoder: nn.Module) -> str:
        """The encoder's fingerprint (the one given at construction, else computed once per encoder object)."""
        if self.fixed_fingerprint is not None:
            return self.fixed_fingerprint
        if encoder not in self._fingerprints:
            self._fingerprints[encoder] = encoder_fingerprint(encoder)
        return self._fingerprints[encoder]

    def features(self, encoder: nn.Module, images: Tensor, digests: Optional[list] = None) -> VisionFeatures:
        """The encoder's VisionFeatures of images [N, ...]: cached entries reused, the others computed in one batch
        (each distinct image once) without autograd, then stored. `digests` (one per image, e.g. from
        `image_digests` on the host before the batch moved to the GPU) spare hashing device tensors, which would
        copy them back to the host inside the training step."""
        self.check_encoder(encoder)
        if images.dim() < 2 or images.shape[0] == 0:
            raise ValueError(f"FeatureCache: images must be a non-empty batch [N, ...], got {tuple(images.shape)}")
        if digests is not None and len(digests) != images.shape[0]:
            raise ValueError(f"FeatureCache: {len(digests)} digests for {images.shape[0]} images")
        prefix = self.fingerprint(encoder)
        keys = [f"{prefix}/{d}" for d in (digests if digests is not None else map(tensor_digest, images))]
        entries = {key: self.lookup(key) for key in dict.fromkeys(keys)}
        missing = [key for key, entry in entries.items() if entry is None]
        if missing:
            first = {key: keys.index(key) for key in missing}
            with torch.no_grad():
                out = encoder(images[list(first.values())])
            for j, key in enumerate(missing):
                entries[key] = split_entry(out, j)
                self.store(key, entries[key])
            self.stats["misses"] += len(missing)
        device = out.features.device if missing else _encoder_device(encoder, images)
        return join_entries([entries[key] for key in keys], device)

    def lookup(self, key: str) -> Optional[dict]:
        """The entry of `key` from memory (refreshed as most recent) or disk (then kept in memory), else None."""
        if key in self.memory:
            self.memory.move_to_end(key)
            self.stats["hits"] += 1
            return self.memory[key]
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        entry = read_entry(path)
        self.stats["disk_hits"] += 1
        self.remember(key, entry)
        return entry

    def store(self, key: str, entry: dict) -> None:
        """Keep a new entry in memory and, with a directory, on disk (written to a temp file, then renamed)."""
        self.remember(key, entry)
        path = self.path(key)
        if path is not None:
            tensors = {name: t.cpu() for name, t in entry["tensors"].items()}
            with atomic_write(path) as temp:
                save_file(tensors, str(temp), metadata={"format": "pt", "meta": json.dumps(entry["meta"])})

    def remember(self, key: str, entry: dict) -> None:
        """Put an entry in the memory LRU, evicting the least recently used ones past max_bytes."""
        size = sum(t.numel() * t.element_size() for t in entry["tensors"].values())
        if size > self.max_bytes:
            return
        if self.device is not None:
            entry = dict(entry, tensors={n: t.to(self.device) for n, t in entry["tensors"].items()})
        self.memory[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.memory.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old["tensors"].values())

    def path(self, key: str) -> Optional[Path]:
        """The safetensors file of `key` (None without a directory)."""
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def clear(self) -> None:
        """Drop the memory entries (files on disk stay)."""
        self.memory.clear()
        self.bytes = 0


def split_entry(features: VisionFeatures, i: int) -> dict:
    """Image i of a batch of VisionFeatures as a cache entry: tensors (features [N, D], pooled [D]) and meta.
    Copies, not views: a view would keep the whole batch alive (and pooled often views the CLS feature)."""
    tensors = {"features": features.features[i].detach().clone()}
    if features.pooled is not None:
        tensors["pooled"] = features.pooled[i].detach().clone()
    return {"tensors": tensors, "meta": {"grid": list(features.grid), "cls": bool(features.cls)}}


def join_entries(entries: list, device) -> VisionFeatures:
    """Cache entries of one encoder stacked back into one VisionFeatures on `device`."""
    meta = entries[0]["meta"]
    stack = lambda name: torch.stack([e["tensors"][name].to(device) for e in entries])  # noqa: E731
    pooled = stack("pooled") if "pooled" in entries[0]["tensors"] else None
    return VisionFeatures(stack("features"), tuple(meta["grid"]), cls=meta["cls"], pooled=pooled)


def read_entry(path: Path) -> dict:
    """A cache entry from its safetensors file; ValueError naming the file when it is not one."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"FeatureCache: {path} is not a feature-cache file ({err}); delete it") from err
    if "features" not in tensors:
        raise ValueError(f"FeatureCache: {path} holds no 'features' tensor; delete it")
    return {"tensors": tensors, "meta": meta}


def _encoder_device(encoder: nn.Module, images: Tensor) -> torch.device:
    """Where the encoder computes (its first parameter's device), else where the images are."""
    param = next(encoder.parameters(), None)
    return param.device if param is not None else images.device
