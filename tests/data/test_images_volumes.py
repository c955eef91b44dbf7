"""Image and volume loading and preprocessing against numpy computations written out by hand."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mrgfast.data.errors import BadSampleError
from mrgfast.data.images import CLIP_MEAN, CLIP_STD, ImageConfig, load_image, preprocess_image
from mrgfast.data.volumes import VolumeConfig, load_volume, preprocess_volume


def test_preprocess_image_normalises_per_channel():
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    out = preprocess_image(Image.fromarray(pixels), ImageConfig(size=4, resample="nearest"))
    expected = (pixels.astype(np.float32) / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 4)
    torch.testing.assert_close(out, torch.from_numpy(expected.transpose(2, 0, 1)))


def test_preprocess_image_resizes_grayscale_to_rgb_or_one_channel():
    image = Image.fromarray(np.full((10, 7), 51, dtype=np.uint8))
    rgb = preprocess_image(image, ImageConfig(size=5, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    assert rgb.shape == (3, 5, 5)
    torch.testing.assert_close(rgb, torch.full((3, 5, 5), 0.2))
    gray = preprocess_image(image, ImageConfig(size=6, channels=1, mean=(0.5,), std=(0.5,)))
    assert gray.shape == (1, 6, 6)
    torch.testing.assert_close(gray, torch.full((1, 6, 6), -0.6))


def test_augmentation_is_seeded_never_flips_and_is_off_by_default():
    # A left-right gradient: a horizontal flip would reverse its sign; a crop or jitter cannot.
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1)).astype(np.uint8)
    image = Image.fromarray(ramp)
    config = ImageConfig(size=16, augment=True, mean=(0.0,) * 3, std=(1.0,) * 3)
    first = preprocess_image(image, config, np.random.default_rng(5))
    again = preprocess_image(image, config, np.random.default_rng(5))
    other = preprocess_image(image, config, np.random.default_rng(6))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    for seed in range(20):
        out = preprocess_image(image, config, np.random.default_rng(seed))
        assert out[0, :, -1].mean() > out[0, :, 0].mean()
    plain = ImageConfig(size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.testing.assert_close(preprocess_image(image, plain), preprocess_image(image, plain))
    with pytest.raises(ValueError, match="needs an rng"):
        preprocess_image(image, config)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=0), "size must be positive"), (dict(channels=2), "channels must be 1 or 3"),
    (dict(mean=(0.5,)), "need 3 values each"), (dict(std=(1.0, 0.0, 1.0)), "std must be positive"),
    (dict(resample="lanczos9"), "resample must be one of"), (dict(min_scale=0.0), "min_scale must be in"),
])
def test_image_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageConfig(**kwargs)


def test_load_image_missing_and_corrupt_name_the_path(tmp_path):
    with pytest.raises(BadSampleError, match=r"image file not found: .*nope\.png") as err:
        load_image(tmp_path / "nope.png")
    assert err.value.reason == "missing_image"
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(BadSampleError, match=r"cannot decode image .*bad\.png") as err:
        load_image(tmp_path / "bad.png")
    assert err.value.reason == "corrupt_image"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(BadSampleError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png")


def test_load_volume_npy_npz(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    np.save(tmp_path / "v.npy", volume)
    np.savez(tmp_path / "v.npz", volume=volume, spacing=np.ones(3))
    np.savez_compressed(tmp_path / "w.npz", volume)
    for name in ("v.npy", "v.npz", "w.npz"):
        loaded = load_volume(tmp_path / name)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, volume)


def test_load_volume_errors(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2, 2)), b=np.zeros((2, 2, 2)))
    with pytest.raises(BadSampleError, match=r"two\.npz: \.npz must hold one array or a 'volume' array"):
        load_volume(tmp_path / "two.npz")
    np.save(tmp_path / "flat.npy", np.zeros((3, 3)))
    with pytest.raises(BadSampleError, match=r"flat\.npy: expected 3 dimensions"):
        load_volume(tmp_path / "flat.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(BadSampleError, match=r"cannot read volume .*junk\.npy"):
        load_volume(tmp_path / "junk.npy")
    with pytest.raises(BadSampleError, match=r"volume file not found: .*gone\.npz"):
        load_volume(tmp_path / "gone.npz")
    with pytest.raises(BadSampleError, match=r"unsupported file type"):
        load_volume(tmp_path / "scan.dcm")


def test_nifti_roundtrip_transposes_to_zyx(tmp_path):
    import nibabel
    xyz = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(xyz, np.eye(4)), str(tmp_path / "v.nii.gz"))
    np.testing.assert_allclose(load_volume(tmp_path / "v.nii.gz"), xyz.transpose(2, 1, 0), rtol=1e-6)


def test_nifti_without_nibabel_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)  # makes `import nibabel` fail, installed or not
    (tmp_path / "v.nii.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ImportError, match=r"reading .*v\.nii\.gz needs nibabel.*pip install nibabel"):
        load_volume(tmp_path / "v.nii.gz")


def test_preprocess_volume_clips_scales_and_resamples():
    volume = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0, 0.0, 0.0], np.float32).reshape(2, 2, 2)
    out = preprocess_volume(volume, VolumeConfig())
    expected = np.clip(volume, -1000, 1000) / 1000.0
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[0], torch.from_numpy(expected))
    constant = preprocess_volume(np.full((3, 4, 5), 200.0, np.float32), VolumeConfig(shape=(6, 2, 3)))
    assert constant.shape == (1, 6, 2, 3)
    torch.testing.assert_close(constant, torch.full((1, 6, 2, 3), 0.2))
    window = preprocess_volume(np.array([[[-200.0, 0.0], [200.0, 400.0]]]), VolumeConfig(hu_min=-200, hu_max=200))
    torch.testing.assert_close(window[0, 0], torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(hu_min=10, hu_max=10), "hu_max"), (dict(shape=(2, 2)), "three positive sizes"),
    (dict(shape=(2, 0, 2)), "three positive sizes"),
])
def test_volume_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VolumeConfig(**kwargs)
