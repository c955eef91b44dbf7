"""Helpers for the data tests: small files written on demand, and the size of the shared demo dataset."""

import json

import numpy as np
from PIL import Image

DEMO = dict(seed=3, n=12, size=64, n_volumes=4, volume_size=16)


def write_png(path, value: int = 128, size: int = 8):
    """Write a small gray PNG at `path` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)
    return path


def write_json(path, data):
    """Write `data` as JSON at `path` and return the path."""
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
