"""R2Gen and PeFoMed text processing on concrete examples, including R2Gen's regex range subtlety."""

import pytest

from mrgfast.data.text import (clean_report_iu_xray, clean_report_mimic_cxr, get_cleaner, pefomed_pre_caption,
                               pefomed_pre_question)


@pytest.mark.parametrize("report, expected", [
    ("The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
     "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear ."),
    # list numbering: "1. " removed, ". 2. " becomes ". "
    ("1. No acute disease. 2. Stable nodule.", "no acute disease . stable nodule ."),
    # " 3. " (no full stop before it) also becomes a sentence break
    ("No effusion 3. Clear lungs.", "no effusion . clear lungs ."),
    # "..." collapses to "."
    ("Normal heart... Clear lungs.", "normal heart . clear lungs ."),
    # quotes, slashes, backslashes and apostrophes go; commas, brackets, colons, %+*&^_! too; '-' stays
    ('Patient\'s "AP/PA" view\\ (portable), [stable]; {ok}: 5% +/- 1*2 & ^_!',
     "patients appa view portable stable ok 5 - 12   ."),
])
def test_clean_report_iu_xray(report, expected):
    assert clean_report_iu_xray(report) == expected


def test_r2gen_class_range_removes_less_than_to_at_but_keeps_hyphen():
    # `:-\[` in R2Gen's class is the range ':'..'[', which covers ;<=>?@ (and A-Z, lowercased earlier);
    # '-' itself is not in the class, so "x-ray" keeps its hyphen; '#', '~', '$' and '|' stay too.
    assert clean_report_iu_xray("Nodule @ left base <5mm> = stable?") == "nodule  left base 5mm  stable ."
    assert clean_report_iu_xray("Chest x-ray #2 ~ $1 | ok") == "chest x-ray #2 ~ $1 | ok ."


def test_r2gen_keeps_empty_sentences():
    # R2Gen filters sentences with `!= []`, which a string always passes: empty sentences stay.
    assert clean_report_iu_xray("Heart normal. . Lungs clear.") == "heart normal .  . lungs clear ."
    assert clean_report_iu_xray("") == " ."


def test_clean_report_mimic_cxr_newlines_underscores_spaces():
    report = "FINDINGS:\n\nPA and lateral views of the chest.  Heart size is normal.\n IMPRESSION: No acute process___"
    assert clean_report_mimic_cxr(report) == ("findings pa and lateral views of the chest . heart size is normal . "
                                              "impression no acute process .")


def test_mimic_and_iu_differ_on_newlines():
    report = "Heart size normal.\nLungs clear."
    assert clean_report_iu_xray(report) == "heart size normal\nlungs clear ."
    # MIMIC turns the newline into a space first, so ".\n" becomes a sentence break
    assert clean_report_mimic_cxr(report) == "heart size normal . lungs clear ."


def test_pefomed_pre_caption_keeps_commas_and_cuts_to_50_words():
    text = 'The heart is normal; lungs: clear! (no effusion), ~stable #1 "ok"'
    assert pefomed_pre_caption(text) == "the heart is normal lungs clear no effusion , stable 1 ok"
    long = " ".join(f"w{i}" for i in range(60))
    assert pefomed_pre_caption(long) == " ".join(f"w{i}" for i in range(50))
    assert pefomed_pre_caption(long, max_words=None) == long


def test_pefomed_pre_question_drops_without_spaces_and_keeps_question_mark():
    assert pefomed_pre_question("What is shown? (Axial CT)") == "what is shown? axial ct"
    assert pefomed_pre_question("Is there  an effusion.  ") == "is there  an effusion"


def test_get_cleaner():
    assert get_cleaner("iu_xray") is clean_report_iu_xray
    assert get_cleaner("none") is None and get_cleaner(None) is None
    assert get_cleaner(str.upper) is str.upper
    assert get_cleaner("pefomed")("A. B") == "a b"
    with pytest.raises(ValueError, match="clean must be one of"):
        get_cleaner("r2gen")
