"""VQA questions about a synthetic study: closed yes/no and open side/abnormality questions, VQA-RAD fields."""

from mrgfast.data.synthetic.findings import Findings


def _yes(flag: bool) -> str:
    """VQA-RAD's closed answers."""
    return "yes" if flag else "no"


def study_questions(findings: Findings) -> list:
    """(question, answer, answer_type, question_type) tuples answerable from the image alone."""
    questions = [
        ("is the heart enlarged?", _yes(findings.cardiomegaly), "CLOSED", "SIZE"),
        ("is there a pleural effusion?", _yes(findings.effusion is not None), "CLOSED", "PRES"),
        ("is there a lung nodule?", _yes(findings.nodule is not None), "CLOSED", "PRES"),
        ("is this chest x-ray normal?", _yes(findings.normal), "CLOSED", "ABN"),
        ("is there an effusion on the left side?", _yes(findings.effusion in ("left", "both")), "CLOSED", "POS"),
    ]
    if findings.effusion is not None:
        questions.append(("which side is the pleural effusion on?", findings.effusion, "OPEN", "POS"))
    if findings.nodule is not None:
        questions.append(("which lung contains the nodule?", findings.nodule, "OPEN", "POS"))
    answer = " and ".join(findings.abnormalities()) or "none"
    questions.append(("what abnormality is seen in this image?", answer, "OPEN", "ABN"))
    return questions
