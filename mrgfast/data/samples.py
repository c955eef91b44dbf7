"""The sample record every reader produces, and the list of samples with its read statistics."""

import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from mrgfast.data.errors import BadSampleError, DataFormatError

TASKS = ("report", "vqa", "caption")
MODALITIES = ("image", "volume")


@dataclass(frozen=True)
class Sample:
    """One training/eval example: image or volume paths, the instruction, the target text, optional extras.

    `prompt` is the bare instruction or question (the chat template and the `[task]` tag are added by the
    prompt builder); `answer` is the target (the chosen report of a preference pair); `rejected` is set
    only for preference pairs; `labels` maps finding names to 1/0/-1 where the source gives them;
    `source` says where the entry came from ("file[entry]"), for error messages.
    """

    id: str
    task: str
    prompt: str
    answer: str
    image_paths: tuple = ()
    modality: str = "image"
    rejected: Optional[str] = None
    labels: Optional[dict] = None
    answer_type: Optional[str] = None
    split: Optional[str] = None
    source: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Sample {self.id!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"Sample {self.id!r}: modality must be one of {MODALITIES}, got {self.modality!r}")


class SampleSet(list):
    """A list of Samples that also carries `stats`: counts of what the reader kept, skipped and truncated."""

    def __init__(self, samples=(), stats: Optional[Counter] = None):
        super().__init__(samples)
        self.stats = Counter() if stats is None else stats


def prepare_text(text, clean: Optional[Callable[[str], str]], max_words: Optional[int], stats: Counter,
                 what: str, where: str, sample_id: str) -> str:
    """Clean `text`, raise BadSampleError if nothing is left, cut it to `max_words` words (counted in stats).

    The word budget counts whitespace-separated tokens of the cleaned text, which is what R2Gen's
    `max_seq_length` counts (its tokenizer splits the cleaned report on spaces).
    """
    text = "" if text is None else str(text)
    cleaned = clean(text) if clean is not None else text.strip()
    if not any(ch.isalnum() for ch in cleaned):
        raise BadSampleError(f"{where} (id={sample_id}): {what} is empty (got {text!r})", sample_id=sample_id,
                             reason=f"empty_{what}")
    if max_words is not None:
        words = cleaned.split()
        if len(words) > max_words:
            stats[f"truncated_{what}"] += 1
            cleaned = " ".join(words[:max_words])
    return cleaned


def resolve_path(root, relative: str, where: str, sample_id: str, check: bool, allow_outside: bool = False) -> str:
    """`root / relative` (normalised) as a string; if `check`, a missing file raises BadSampleError naming the path.

    A path that leaves `root` (absolute, or climbing out with '..') is a DataFormatError naming the entry unless
    `allow_outside`: an annotation must not make a run read files outside its dataset (or tell, by the error, whether
    such a file exists). The path is normalised as text ('..' resolved) and returned so, so what is checked is what
    is opened; symlinks are not followed: links inside the image directory are the dataset owner's choice (e.g.
    images linked from a shared store).
    """
    path = os.path.normpath(os.path.join(str(root), relative)) if root is not None else relative
    if root is not None and not allow_outside and not inside(str(root), path):
        raise DataFormatError(f"{where} (id={sample_id}): image path {relative!r} lies outside the image directory "
                              f"{root}; set data.allow_outside_image_dir=true if the dataset really points elsewhere")
    if check and not os.path.isfile(path):
        raise BadSampleError(f"{where} (id={sample_id}): image file not found: {path}", sample_id=sample_id,
                             path=path, reason="missing_image")
    return path


def inside(root: str, path: str) -> bool:
    """Whether `path`, normalised ('..' and '.' resolved as text), lies inside the directory `root`."""
    base = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([base, os.path.normpath(os.path.abspath(path))]) == base


def describe_stats(stats) -> str:
    """Reader / dataset counts as one line: 'read 12, kept 10, skipped_missing_image 2, truncated_report 1'."""
    first = [key for key in ("read", "kept") if key in stats]
    rest = sorted(key for key in stats if key not in first and stats[key])
    return ", ".join(f"{key} {stats[key]}" for key in first + rest) or "no counts"


def collect_samples(entries, build: Callable, skip_bad_samples: bool) -> SampleSet:
    """Build a Sample from each (where, entry); bad samples raise, or are skipped and counted by reason.

    `build(where, entry, stats)` returns a Sample, or None to drop the entry on purpose (it counts its
    own reason then, e.g. a SLAKE question that is not in English).
    """
    samples = SampleSet()
    for where, entry in entries:
        samples.stats["read"] += 1
        try:
            sample = build(where, entry, samples.stats)
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            samples.stats[f"skipped_{err.reason}"] += 1
            continue
        if sample is not None:
            samples.append(sample)
    samples.stats["kept"] = len(samples)
    return samples
