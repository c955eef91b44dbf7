"""Medical VQA exact-match accuracy with PeFoMed's answer normalisation, split into closed and open questions."""

import re
from typing import Sequence

# PeFoMed's MedVQAEval (pefomed/common/medvqa_tools/vqa_eval.py), itself the official VQA v2 evaluation minus its
# 10-annotator soft score. Its tables are reproduced unchanged so accuracies match PeFoMed's.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# The original's lookbehind is mistyped as `(?!<=\d)`, so in effect: drop every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The original passes re.UNICODE (32) where re.sub takes `count`, so at most 32 periods are dropped.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

ANSWER_TYPES = ("closed", "open")


def _strip_punctuation(text: str) -> str:
    """VQA's processPunctuation: remove a mark next to a space (or anywhere if digits have commas), else space it."""
    out = text
    digit_commas = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # Tested on the original text, not on `out`, as the reference implementation does.
        if mark + " " in text or " " + mark in text or digit_commas:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def _digits_and_articles(text: str) -> str:
    """VQA's processDigitArticle: lowercase, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(answer) -> str:
    """An answer as PeFoMed's MedVQAEval.preprocess_answer normalises it before exact matching.

    Punctuation handling of the official VQA evaluation, lowercasing, number words to digits ('none' -> '0'),
    articles dropped, contractions restored, then commas dropped and 'x ray' -> 'xray'.
    """
    text = _digits_and_articles(_strip_punctuation(str(answer)))
    return text.replace(",", "").replace("x ray", "xray").replace("\n", " ").replace("\t", " ")


def _checked_answers(values: Sequence, name: str) -> list:
    """`values` as a list of answers (strings or numbers, which PeFoMed turns into text); else raise."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence (one entry per question), got {type(values).__name__}")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(f"{name}[{index}] must be a string answer, got {type(value).__name__} {value!r:.60}")
    return list(values)


def vqa_matches(predictions: Sequence[str], answers: Sequence[str]) -> list:
    """Per question, whether the prediction equals the answer after `normalize_vqa_answer`."""
    preds = _checked_answers(predictions, "predictions")
    golds = _checked_answers(answers, "answers")
    if len(preds) != len(golds):
        raise ValueError(f"predictions and answers must pair up one to one, got {len(preds)} predictions "
                         f"and {len(golds)} answers")
    return [normalize_vqa_answer(p) == normalize_vqa_answer(g) for p, g in zip(preds, golds)]


def _answer_type(value, index: int) -> str:
    """'closed' or 'open' from a dataset's answer_type ('CLOSED', 'OPEN', any case, surrounding spaces allowed)."""
    kind = value.strip().lower() if isinstance(value, str) else None
    if kind not in ANSWER_TYPES:
        raise ValueError(f"answer_types[{index}] must be 'CLOSED' or 'OPEN' (any case), got {value!r:.60}")
    return kind


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str]) -> dict:
    """Exact-match accuracy overall, on closed and on open questions, with the number of questions of each kind.

    Accuracies are fractions in [0, 1] (PeFoMed prints 100x, rounded to 2 places); a kind with no questions has
    accuracy None. Keys: overall, closed, open, n_overall, n_closed, n_open.
    """
    matches = vqa_matches(predictions, answers)
    if isinstance(answer_types, str) or not isinstance(answer_types, Sequence):
        raise TypeError(f"answer_types must be a sequence of 'CLOSED'/'OPEN', got {type(answer_types).__name__}")
    if len(answer_types) != len(matches):
        raise ValueError(f"answer_types must give one type per question: got {len(answer_types)} types "
                         f"for {len(matches)} questions")
    if not matches:
        raise ValueError("vqa_accuracy needs at least one question, got none")
    kinds = [_answer_type(value, index) for index, value in enumerate(answer_types)]
    result = {"overall": sum(matches) / len(matches)}
    for kind in ANSWER_TYPES:
        hits = [match for match, k in zip(matches, kinds) if k == kind]
        result[kind] = sum(hits) / len(hits) if hits else None
    result["n_overall"] = len(matches)
    for kind in ANSWER_TYPES:
        result[f"n_{kind}"] = kinds.count(kind)
    return result
