"""Readers for medical VQA: VQA-RAD and SLAKE JSON files (closed yes/no and open questions)."""

from pathlib import Path
from typing import Optional

from mrgfast.data.errors import DataFormatError
from mrgfast.data.jsonio import get_field, load_json_list
from mrgfast.data.samples import Sample, SampleSet, collect_samples, prepare_text, resolve_path
from mrgfast.data.text import get_cleaner

ANSWER_TYPES = ("CLOSED", "OPEN")
VQA_RAD_FIELDS = ("qid", "image_name", "question", "answer", "answer_type")
SLAKE_FIELDS = ("qid", "img_name", "question", "answer", "answer_type", "q_lang")


def read_vqa_rad(path, image_dir=None, clean_question=None, clean_answer=None, max_words: Optional[int] = None,
                 skip_bad_samples: bool = False, check_images: bool = True, allow_outside: bool = False) -> SampleSet:
    """Read a VQA-RAD JSON list (`qid`, `image_name`, `question`, `answer`, `answer_type` CLOSED|OPEN).

    image_dir defaults to the file's folder. Question and answer are kept as written unless a cleaner is
    given ("pefomed" or a callable); numeric answers become strings. max_words limits the answer.
    """
    return _read_vqa(path, image_dir, "image_name", VQA_RAD_FIELDS, None, clean_question, clean_answer,
                     max_words, skip_bad_samples, check_images, allow_outside)


def read_slake(path, image_dir=None, language: str = "en", clean_question=None, clean_answer=None,
               max_words: Optional[int] = None, skip_bad_samples: bool = False,
               check_images: bool = True, allow_outside: bool = False) -> SampleSet:
    """Read a SLAKE JSON list (`img_name`, `question`, `answer`, `answer_type`, `q_lang`), keeping `language`.

    Questions in other languages are dropped and counted as `stats["skipped_language"]`.
    """
    return _read_vqa(path, image_dir, "img_name", SLAKE_FIELDS, language, clean_question, clean_answer,
                     max_words, skip_bad_samples, check_images, allow_outside)


def _read_vqa(path, image_dir, image_key: str, fields: tuple, language: Optional[str], clean_question,
              clean_answer, max_words, skip_bad_samples: bool, check_images: bool, allow_outside: bool) -> SampleSet:
    """Shared VQA-RAD / SLAKE reader; `language` set means filter on `q_lang`."""
    path = Path(path)
    data = load_json_list(path, f"question entries with fields {list(fields)}")
    image_dir = path.parent if image_dir is None else Path(image_dir)
    question_cleaner, answer_cleaner = get_cleaner(clean_question), get_cleaner(clean_answer)

    def build(where, entry, stats):
        """One question entry -> Sample, or None for another language."""
        if language is not None and get_field(entry, "q_lang", str, where, fields) != language:
            stats["skipped_language"] += 1
            return None
        sample_id = str(get_field(entry, "qid", (str, int), where, fields))
        image = get_field(entry, image_key, str, where, fields)
        question = get_field(entry, "question", str, where, fields)
        answer = get_field(entry, "answer", (str, int, float), where, fields)
        answer_type = get_field(entry, "answer_type", str, where, fields).strip().upper()
        if answer_type not in ANSWER_TYPES:
            raise DataFormatError(f"{where} (id={sample_id}): 'answer_type' must be one of {ANSWER_TYPES}, "
                                  f"got {entry['answer_type']!r}")
        prompt = prepare_text(question, question_cleaner, None, stats, "question", where, sample_id)
        answer = prepare_text(str(answer), answer_cleaner, max_words, stats, "answer", where, sample_id)
        return Sample(id=sample_id, task="vqa", prompt=prompt, answer=answer, answer_type=answer_type,
                      image_paths=(resolve_path(image_dir, image, where, sample_id, check_images, allow_outside),),
                      source=where)

    return collect_samples(((f"{path}[{i}]", e) for i, e in enumerate(data)), build, skip_bad_samples)
