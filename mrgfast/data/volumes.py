"""3D volume loading (.npy / .npz always, .nii / .nii.gz through nibabel) and CT preprocessing."""

import importlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mrgfast.data.errors import BadSampleError

VOLUME_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz")


@dataclass(frozen=True)
class VolumeConfig:
    """CT preprocessing: clip HU to [hu_min, hu_max], scale to [-1, 1], resample to `shape` (D, H, W).

    CT-CLIP (RAD3D-Prefix) clips to [-1000, 1000] and resamples to 240 x 480 x 480; `shape=None` keeps
    the stored size.
    """

    shape: Optional[tuple] = None
    hu_min: float = -1000.0
    hu_max: float = 1000.0

    def __post_init__(self):
        if self.hu_max <= self.hu_min:
            raise ValueError(f"VolumeConfig: hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        if self.shape is not None and (len(self.shape) != 3 or any(int(s) <= 0 for s in self.shape)):
            raise ValueError(f"VolumeConfig.shape must be three positive sizes (D, H, W), got {self.shape}")


def _nibabel():
    """The nibabel module, or None when it is not installed."""
    try:
        return importlib.import_module("nibabel")
    except ImportError:
        return None


def load_volume(path) -> np.ndarray:
    """Read a 3D volume as float32 [D, H, W]; errors name the path. NIfTI (x, y, z) is returned as (z, y, x).

    `.npz` files hold one array, or several with the volume under the key "volume".
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(VOLUME_SUFFIXES):
        raise BadSampleError(f"volume {path}: unsupported file type, expected one of {VOLUME_SUFFIXES}",
                             path=str(path), reason="unsupported_volume")
    if not path.is_file():
        raise BadSampleError(f"volume file not found: {path}", path=str(path), reason="missing_image")
    try:
        if name.endswith(".npy"):
            volume = np.load(path, allow_pickle=False)
        elif name.endswith(".npz"):
            volume = _load_npz(path)
        else:
            volume = _load_nifti(path)
    except BadSampleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise BadSampleError(f"cannot read volume {path}: {err}", path=str(path), reason="corrupt_image") from None
    if volume.ndim != 3:
        raise BadSampleError(f"volume {path}: expected 3 dimensions (D, H, W), got shape {volume.shape}",
                             path=str(path), reason="corrupt_image")
    return np.asarray(volume, dtype=np.float32)


def _load_npz(path: Path) -> np.ndarray:
    """The single array in an .npz, or the one named 'volume'."""
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        if "volume" in keys:
            return archive["volume"]
        if len(keys) == 1:
            return archive[keys[0]]
    raise BadSampleError(f"volume {path}: .npz must hold one array or a 'volume' array, found keys {keys}",
                         path=str(path), reason="corrupt_image")


def _load_nifti(path: Path) -> np.ndarray:
    """NIfTI through nibabel (scl_slope/inter applied by get_fdata), transposed from (x, y, z) to (z, y, x)."""
    nibabel = _nibabel()
    if nibabel is None:
        raise ImportError(f"reading {path} needs nibabel, which is not installed: pip install nibabel "
                          "(or convert the volumes to .npy/.npz)")
    data = nibabel.load(str(path)).get_fdata(dtype=np.float32)
    if data.ndim != 3:
        raise BadSampleError(f"volume {path}: expected a 3D NIfTI, got shape {data.shape}",
                             path=str(path), reason="corrupt_image")
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def preprocess_volume(volume: np.ndarray, config: VolumeConfig) -> torch.Tensor:
    """HU volume [D, H, W] -> float32 tensor [1, D, H, W] clipped, scaled to [-1, 1] and resampled."""
    clipped = np.clip(volume.astype(np.float32), config.hu_min, config.hu_max)
    centre = (config.hu_max + config.hu_min) / 2.0
    half = (config.hu_max - config.hu_min) / 2.0
    tensor = torch.from_numpy((clipped - centre) / half)[None]
    if config.shape is not None and tuple(tensor.shape[1:]) != tuple(int(s) for s in config.shape):
        size = tuple(int(s) for s in config.shape)
        tensor = torch.nn.functional.interpolate(tensor[None], size=size, mode="trilinear", align_corners=False)[0]
    return tensor.contiguous()
