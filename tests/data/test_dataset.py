"""MedicalDataset: items a collator can consume, bad files named or skipped and counted, seeded augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from mrgfast.data import BadSampleError, ImageConfig, MedicalDataset, Sample, SampleSet, VolumeConfig
from tests.data.files import write_png

SMALL = ImageConfig(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def report_sample(sample_id, *paths, **extra):
    """A report Sample over the given image paths."""
    return Sample(id=sample_id, task="report", prompt="Describe.", answer=f"report {sample_id}",
                  image_paths=tuple(str(p) for p in paths), source=f"test[{sample_id}]", **extra)


@pytest.fixture
def images(tmp_path):
    """Three good PNGs (values 0, 128, 255) and one corrupt file."""
    paths = [write_png(tmp_path / f"{v}.png", value=v) for v in (0, 128, 255)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    return paths, corrupt


def test_items_carry_what_a_collator_needs(images):
    (black, gray, white), _ = images
    samples = [report_sample("two-views", black, white, labels={"Cardiomegaly": 1}),
               report_sample("pair", gray, rejected="wrong report"),
               Sample(id="q1", task="vqa", prompt="Is it?", answer="yes", image_paths=(str(gray),),
                      answer_type="CLOSED")]
    dataset = MedicalDataset(samples, SMALL)
    item = dataset[0]
    assert item["pixel_values"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(item["pixel_values"][0], torch.full((3, 8, 8), -1.0))
    torch.testing.assert_close(item["pixel_values"][1], torch.full((3, 8, 8), 1.0))
    assert (item["id"], item["task"], item["prompt"], item["answer"], item["index"]) == (
        "two-views", "report", "Describe.", "report two-views", 0)
    assert item["labels"] == {"Cardiomegaly": 1} and "rejected" not in item
    assert dataset[1]["rejected"] == "wrong report" and dataset[1]["pixel_values"].shape == (1, 3, 8, 8)
    assert dataset[2]["answer_type"] == "CLOSED" and dataset[2]["task"] == "vqa"


def test_corrupt_image_error_names_the_sample_and_path(images):
    (black, _, _), corrupt = images
    dataset = MedicalDataset([report_sample("ok", black), report_sample("broken", black, corrupt)], SMALL)
    with pytest.raises(BadSampleError, match=r"sample 1 \(id=broken, from test\[broken\]\).*corrupt\.png") as err:
        dataset[1]
    assert err.value.sample_id == "broken" and err.value.path.endswith("corrupt.png")
    assert err.value.reason == "corrupt_image"


def test_skip_bad_samples_returns_the_next_good_one_and_counts(images):
    (black, gray, _), corrupt = images
    samples = SampleSet([report_sample("a", black), report_sample("bad", corrupt), report_sample("b", gray)])
    samples.stats.update({"read": 4, "truncated_report": 1})
    dataset = MedicalDataset(samples, SMALL, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample: sample 1 \(id=bad"):
        assert dataset[1]["id"] == "b"
    assert dataset[1]["id"] == "b"  # counted once
    assert dataset.stats["skipped_corrupt_image"] == 1 and dataset.stats["truncated_report"] == 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list)
    assert [[item["id"] for item in batch] for batch in loader] == [["a", "b"], ["b"]]


def test_skip_wraps_around_and_all_bad_raises(images):
    (black, _, _), corrupt = images
    dataset = MedicalDataset([report_sample("a", black), report_sample("bad", corrupt)], SMALL, skip_bad_samples=True)
    with pytest.warns(UserWarning):
        assert dataset[1]["id"] == "a"
    with pytest.warns(UserWarning), pytest.raises(BadSampleError, match="every one of the 1 samples failed"):
        MedicalDataset([report_sample("bad", corrupt)], SMALL, skip_bad_samples=True)[0]


def test_check_drops_and_counts_or_raises(images):
    (black, gray, _), corrupt = images
    samples = [report_sample("a", black), report_sample("bad", corrupt), report_sample("gone", black.parent / "x.png"),
               report_sample("b", gray)]
    with pytest.raises(BadSampleError, match=r"sample 1 \(id=bad"):
        MedicalDataset(samples, SMALL).check()
    with pytest.warns(UserWarning):
        dataset = MedicalDataset(samples, SMALL, skip_bad_samples=True).check()
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["a", "b"]
    assert dataset.stats["skipped_corrupt_image"] == 1 and dataset.stats["skipped_missing_image"] == 1
    assert dataset.stats["kept"] == 2


def test_volume_items(tmp_path):
    np.save(tmp_path / "v.npy", np.full((4, 4, 4), 500, dtype=np.int16))
    sample = Sample(id="ct", task="report", prompt="Findings?", answer="x", image_paths=(str(tmp_path / "v.npy"),),
                    modality="volume", labels={"Emphysema": 0})
    item = MedicalDataset([sample], volume_config=VolumeConfig(shape=(2, 3, 3)))[0]
    assert item["modality"] == "volume" and item["labels"] == {"Emphysema": 0}
    torch.testing.assert_close(item["pixel_values"], torch.full((1, 2, 3, 3), 0.5))


def test_media_config_is_the_one_the_samples_are_loaded_with():
    volume = Sample(id="ct", task="report", prompt="", answer="x", image_paths=("v.npy",), modality="volume")
    image = Sample(id="cxr", task="report", prompt="", answer="x", image_paths=("a.png",))
    volumes, pictures = VolumeConfig(shape=(4, 4, 4)), ImageConfig(size=8)
    assert MedicalDataset([volume], pictures, volumes).media_config is volumes
    assert MedicalDataset([image], pictures, volumes).media_config is pictures


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8)).save(path)
    config = ImageConfig(size=16, augment=True)
    dataset = MedicalDataset([report_sample("a", path)], config, seed=1)
    first = dataset[0]["pixel_values"]
    torch.testing.assert_close(dataset[0]["pixel_values"], first)
    torch.testing.assert_close(MedicalDataset([report_sample("a", path)], config, seed=1)[0]["pixel_values"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], first)


def test_sample_and_dataset_validation():
    with pytest.raises(ValueError, match="task must be one of"):
        Sample(id="x", task="summarise", prompt="", answer="a")
    with pytest.raises(ValueError, match="modality must be one of"):
        Sample(id="x", task="report", prompt="", answer="a", modality="video")
    with pytest.raises(TypeError, match=r"samples\[0\] must be a Sample"):
        MedicalDataset([{"id": "x"}])
    with pytest.raises(BadSampleError, match="has no image paths"):
        MedicalDataset([Sample(id="x", task="report", prompt="", answer="a")])[0]
