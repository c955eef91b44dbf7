"""Report text processing exactly as the published recipes do it (R2Gen cleaning, PeFoMed's BLIP processors)."""

import functools
import re
from typing import Optional

# R2Gen's character class. `:-\[` is a *range* (0x3A-0x5B), so `;<=>?@` and `A-Z` are removed too;
# the text is lowercased first, so in practice the range removes `<=>?@` beyond the listed characters.
_R2GEN_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
# PeFoMed (BLIP's caption/question processors): these characters, not all punctuation (commas stay).
_PEFOMED_PUNCT = re.compile(r"([.!\"()*#:;~])")


def _r2gen_sentence(sentence: str) -> str:
    """R2Gen's `sent_cleaner`: drop quotes, slashes, backslashes, apostrophes, then the character class."""
    stripped = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _R2GEN_PUNCT.sub("", stripped)


def _r2gen_join(text: str) -> str:
    """Split on '. ', clean each sentence and join as R2Gen does (empty sentences are kept, as in R2Gen)."""
    # R2Gen filters with `sent_cleaner(sent) != []`, a string-vs-list test that is always true.
    sentences = [_r2gen_sentence(sent) for sent in text.strip().lower().split(". ")]
    return " . ".join(sentences) + " ."


def _drop_numbering(text: str) -> str:
    """R2Gen's removal of list numbering `1. ` ... `5. `, in its exact order."""
    text = text.replace("1. ", "")
    for n in range(2, 6):
        text = text.replace(f". {n}. ", ". ")
    for n in range(2, 6):
        text = text.replace(f" {n}. ", ". ")
    return text


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's `clean_report_iu_xray`: collapse '..', drop numbering, lowercase, strip punctuation per sentence."""
    text = report
    for _ in range(3):
        text = text.replace("..", ".")
    return _r2gen_join(_drop_numbering(text))


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's `clean_report_mimic_cxr`: newlines to spaces, collapse '__' and double spaces, then as IU."""
    text = report.replace("\n", " ")
    for _ in range(7):
        text = text.replace("__", "_")
    for _ in range(6):
        text = text.replace("  ", " ")
    for _ in range(8):
        text = text.replace("..", ".")
    return _r2gen_join(_drop_numbering(text))


def pefomed_pre_caption(caption: str, max_words: Optional[int] = 50) -> str:
    """PeFoMed's report/caption processing (BLIP `pre_caption`): lowercase, punctuation to spaces, first 50 words.

    `max_words=None` skips the cut, so a reader can truncate (and count) with its own budget.
    """
    caption = _PEFOMED_PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if max_words is not None and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pefomed_pre_question(question: str, max_words: Optional[int] = 50) -> str:
    """PeFoMed's question processing (BLIP `pre_question`): lowercase, drop punctuation, first 50 words."""
    question = _PEFOMED_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if max_words is not None and len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


CLEANERS = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
    # Readers truncate (and count) with their own word budget, so the cleaner itself does not cut.
    "pefomed": functools.partial(pefomed_pre_caption, max_words=None),
    "none": None,
}


def get_cleaner(name):
    """The cleaning function called `name` (see CLEANERS), or `name` itself if it is already callable."""
    if name is None or callable(name):
        return name
    if name not in CLEANERS:
        raise ValueError(f"clean must be one of {sorted(CLEANERS)} or a callable, got {name!r}")
    return CLEANERS[name]
