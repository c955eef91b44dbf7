"""VQA exact match with PeFoMed's normalisation (pefomed/common/medvqa_tools/vqa_eval.py), split closed/open."""

import pytest

from mrgfast.metrics import normalize_vqa_answer, vqa_accuracy, vqa_matches

# (raw answer, what PeFoMed's preprocess_answer makes of it), worked out by hand from its rules.
NORMALISED = [
    ("Yes", "yes"),
    ("yes.", "yes"),                          # periods not before a digit are dropped
    ("  NO  ", "no"),                         # lowercased, whitespace collapsed
    ("The left lung", "left lung"),           # articles dropped
    ("an X-Ray", "xray"),                     # '-' between letters becomes a space, then 'x ray' -> 'xray'
    ("x ray", "xray"),
    ("two", "2"),                             # number words become digits ...
    ("None", "0"),                            # ... 'none' included
    ("right, lower lobe", "right lower lobe"),  # ',' next to a space is removed
    ("t1/t2", "t1 t2"),                       # '/' not next to a space becomes a space
    ("1,000", "1000"),                        # digit commas go
    ("0.5 cm", "0.5 cm"),                     # a decimal point survives
    ("isnt", "isn't"),                        # contractions are restored
    ("left (mostly)", "left mostly"),
    ("a\tb\nc", "b c"),                       # tabs/newlines are whitespace; 'a' is an article
    (3, "3"),                                 # numbers are compared as text, as PeFoMed does str(answer)
]


@pytest.mark.parametrize("raw,expected", NORMALISED)
def test_normalisation_follows_pefomed(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_accuracy_overall_closed_open_and_counts():
    predictions = ["Yes.", "no", "YES", "the left lung", "right lung", "Two", "pleural effusion!"]
    answers = ["yes", "yes", "yes", "Left lung", "left lung", "2", "Pleural effusion"]
    kinds = ["CLOSED", "CLOSED", "closed ", "OPEN", "OPEN", "open", "OPEN"]
    assert vqa_matches(predictions, answers) == [True, False, True, True, False, True, True]
    assert vqa_accuracy(predictions, answers, kinds) == {
        "overall": 5 / 7, "closed": 2 / 3, "open": 3 / 4, "n_overall": 7, "n_closed": 3, "n_open": 4}


def test_missing_kind_has_no_accuracy():
    result = vqa_accuracy(["yes", "no"], ["yes", "yes"], ["CLOSED", "CLOSED"])
    assert result["overall"] == 0.5 and result["closed"] == 0.5
    assert result["open"] is None and result["n_open"] == 0


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="2 predictions and 1 answers"):
        vqa_accuracy(["a", "b"], ["a"], ["OPEN"])
    with pytest.raises(ValueError, match="1 types for 2 questions"):
        vqa_accuracy(["a", "b"], ["a", "b"], ["OPEN"])
    with pytest.raises(ValueError, match=r"answer_types\[1\] must be 'CLOSED' or 'OPEN'.*'yes/no'"):
        vqa_accuracy(["a", "b"], ["a", "b"], ["OPEN", "yes/no"])
    with pytest.raises(ValueError, match="at least one question"):
        vqa_accuracy([], [], [])
    with pytest.raises(TypeError, match=r"predictions\[0\] must be a string"):
        vqa_accuracy([None], ["a"], ["OPEN"])
    with pytest.raises(TypeError, match="answers must be a sequence"):
        vqa_accuracy(["a"], "a", ["OPEN"])
