"""Reader for preference pairs (DPO): JSONL lines {id, image or images, prompt, chosen, rejected}."""

from pathlib import Path
from typing import Optional

from mrgfast.data.errors import DataFormatError
from mrgfast.data.jsonio import get_field, read_jsonl
from mrgfast.data.samples import Sample, SampleSet, collect_samples, prepare_text, resolve_path
from mrgfast.data.text import get_cleaner

PREFERENCE_FIELDS = ("id", "image or images", "prompt", "chosen", "rejected")


def read_preference_jsonl(path, image_dir=None, clean=None, max_words: Optional[int] = None, task: str = "report",
                          skip_bad_samples: bool = False, check_images: bool = True,
                          allow_outside: bool = False) -> SampleSet:
    """Read preference pairs; `answer` holds the chosen text, `rejected` the rejected one.

    Each line has "image" (one path) or "images" (a list), relative to image_dir (default: the file's
    folder); absolute paths (as mrgfast.onpolicy_pairs writes them) or paths leaving image_dir need
    `allow_outside`. clean and max_words apply to both answers; a pair whose chosen and rejected texts are
    identical after cleaning is an error (it carries no preference).
    """
    path = Path(path)
    image_dir = path.parent if image_dir is None else Path(image_dir)
    cleaner = get_cleaner(clean)

    def build(where, entry, stats):
        """One JSONL line -> Sample with `rejected`."""
        sample_id = str(get_field(entry, "id", (str, int), where, PREFERENCE_FIELDS))
        images = _image_list(entry, where, sample_id)
        prompt = get_field(entry, "prompt", str, where, PREFERENCE_FIELDS)
        chosen = prepare_text(get_field(entry, "chosen", str, where, PREFERENCE_FIELDS), cleaner, max_words,
                              stats, "chosen", where, sample_id)
        rejected = prepare_text(get_field(entry, "rejected", str, where, PREFERENCE_FIELDS), cleaner, max_words,
                                stats, "rejected", where, sample_id)
        if chosen == rejected:
            raise DataFormatError(f"{where} (id={sample_id}): 'chosen' and 'rejected' are the same text")
        return Sample(id=sample_id, task=task, prompt=prompt.strip(), answer=chosen, rejected=rejected,
                      image_paths=tuple(resolve_path(image_dir, p, where, sample_id, check_images, allow_outside)
                                        for p in images),
                      source=where)

    rows = ((f"{path} line {number}", entry) for number, entry in read_jsonl(path))
    return collect_samples(rows, build, skip_bad_samples)


def _image_list(entry, where: str, sample_id: str) -> list:
    """The entry's "image" (one path) or "images" (non-empty list of paths)."""
    if isinstance(entry, dict) and "image" in entry and "images" not in entry:
        return [get_field(entry, "image", str, where, PREFERENCE_FIELDS)]
    images = get_field(entry, "images", list, where, PREFERENCE_FIELDS)
    if not images or not all(isinstance(p, str) for p in images):
        raise DataFormatError(f"{where} (id={sample_id}): 'images' must be a non-empty list of path strings, "
                              f"got {images!r}")
    return images
