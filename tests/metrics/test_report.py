"""report_metrics against pycocoevalcap called the way R2Gen's compute_scores calls it (plus Cider)."""

import subprocess
import sys
import threading
import warnings

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from mrgfast.metrics import report as report_module
from mrgfast.metrics import report_metrics

REFERENCES = [
    "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear .",
    "the cardiomediastinal silhouette is within normal limits . no pneumothorax or pleural effusion .",
    "heart size is mildly enlarged . there is a small left pleural effusion .",
    "no acute cardiopulmonary abnormality .",
    "lungs are hyperexpanded . no focal consolidation .",
]
HYPOTHESES = [
    "the heart is normal in size . the lungs are clear .",
    "",  # an empty generation must score 0, not crash the METEOR jar
    "heart size is enlarged . there is a small right pleural effusion .",
    "no acute cardiopulmonary\nabnormality .",  # a line break would break the jar's line protocol
    "lungs are clear . no pneumothorax .",
]


def r2gen_compute_scores(gts: dict, res: dict, scorers) -> dict:
    """R2Gen's modules/metrics.py compute_scores, transcribed, over the scorers given."""
    eval_res = {}
    for scorer, method in scorers:
        try:
            score, _ = scorer.compute_score(gts, res, verbose=0)
        except TypeError:
            score, _ = scorer.compute_score(gts, res)
        if isinstance(method, list):
            for value, name in zip(score, method):
                eval_res[name] = value
        else:
            eval_res[method] = score
    return eval_res


def as_r2gen_dicts(references, hypotheses) -> tuple:
    """The {i: [text]} dicts R2Gen's trainer builds."""
    return ({i: [text] for i, text in enumerate(references)}, {i: [text] for i, text in enumerate(hypotheses)})


@pytest.fixture(scope="module")
def with_meteor():
    """(report_metrics result, direct pycocoevalcap result) on the example, METEOR included."""
    if not report_module.java_available():
        pytest.skip("METEOR needs `java` on PATH")
    gts, res = as_r2gen_dicts(REFERENCES, HYPOTHESES)
    expected = r2gen_compute_scores(gts, res, [(Bleu(4), ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"]),
                                               (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")])
    # R2Gen itself cannot score a hypothesis holding a line break (the jar reads it as two requests); the
    # documented behaviour is METEOR of the same text with the break turned into a space.
    _, res_one_line = as_r2gen_dicts(REFERENCES, [text.replace("\n", " ") for text in HYPOTHESES])
    jar = Meteor()
    expected.update(r2gen_compute_scores(gts, res_one_line, [(jar, "METEOR")]))
    # report_metrics is handed the same running jar: each EVAL request is scored on its own, so the answer is
    # that of a fresh JVM, and the test starts the JVM (~10 s) once instead of twice.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meteor_module, "Meteor", lambda: jar)
        got = report_metrics(REFERENCES, HYPOTHESES)
    return got, expected


def test_matches_r2gen_compute_scores_exactly(with_meteor):
    got, expected = with_meteor
    assert list(got) == ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
    for name, value in expected.items():
        assert got[name] == float(value), name
        assert type(got[name]) is float, name  # plain floats, so eval.json needs no numpy handling
    assert 0.0 < got["METEOR"] < 1.0 and 0.0 < got["BLEU_4"] < 1.0


def test_empty_hypotheses_everywhere_score_zero():
    scores = report_metrics(["the heart is normal .", "no effusion ."], ["", ""], meteor=False)
    assert scores == {"BLEU_1": 0.0, "BLEU_2": 0.0, "BLEU_3": 0.0, "BLEU_4": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0}


def test_perfect_match_scores_one():
    scores = report_metrics(REFERENCES, list(REFERENCES), meteor=False)
    for n in range(1, 5):
        # pycocoevalcap adds tiny = 1e-9 to its n-gram counts, so a perfect BLEU is 1 - O(1e-10).
        assert scores[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE_L"] == 1.0
    assert scores["CIDEr"] == pytest.approx(10.0)  # CIDEr-D is 10 x the mean n-gram cosine similarity
    assert "METEOR" not in scores


def test_bleu_prints_nothing(capsys):
    report_metrics(REFERENCES, HYPOTHESES, meteor=False)
    assert capsys.readouterr().out == ""


def test_clean_is_applied_to_both_sides():
    def clean(text):
        return text.upper().replace(" .", "")

    got = report_metrics(REFERENCES, HYPOTHESES, clean=clean, meteor=False)
    expected = report_metrics([clean(t) for t in REFERENCES], [clean(t) for t in HYPOTHESES], meteor=False)
    assert got == expected
    assert got != report_metrics(REFERENCES, HYPOTHESES, meteor=False)


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        report_metrics(["a b", "c d"], ["a b"], meteor=False)
    with pytest.raises(ValueError, match="at least one"):
        report_metrics([], [], meteor=False)
    with pytest.raises(TypeError, match=r"hypotheses\[1\] must be a string"):
        report_metrics(["a", "b"], ["a", None], meteor=False)
    with pytest.raises(TypeError, match="references must be a sequence"):
        report_metrics("a b c", "a b c", meteor=False)
    with pytest.raises(TypeError, match="clean must be a callable"):
        report_metrics(["a"], ["a"], clean="lower", meteor=False)
    with pytest.raises(TypeError, match=r"clean\(references\[0\]\) must return a string"):
        report_metrics(["a"], ["a"], clean=lambda text: text.split(), meteor=False)


def test_missing_java_warns_once_and_reports_the_rest(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `java` anywhere on PATH
    monkeypatch.setattr(report_module, "_java_warning_given", False)
    assert not report_module.java_available()
    with pytest.warns(RuntimeWarning, match="java"):
        first = report_metrics(REFERENCES, HYPOTHESES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = report_metrics(REFERENCES, HYPOTHESES)
    assert not [w for w in caught if "java" in str(w.message)]
    assert "METEOR" not in first and first == second
    assert first == report_metrics(REFERENCES, HYPOTHESES, meteor=False)


class DyingMeteor(Meteor):
    """pycocoevalcap's Meteor (its real compute_score) talking to a process that writes to stderr and exits."""

    def __init__(self):
        # Skips Meteor.__init__ so no JVM starts; sets up the two attributes compute_score and __del__ use.
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('jar exploded')"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_meteor_failure_raises_with_java_stderr(monkeypatch):
    made = []

    def make():
        made.append(DyingMeteor())
        return made[-1]

    monkeypatch.setattr(meteor_module, "Meteor", make)
    monkeypatch.setattr(report_module, "java_available", lambda: True)
    with pytest.raises(RuntimeError, match="METEOR.*failed.*jar exploded"):
        report_metrics(REFERENCES, HYPOTHESES)
    # The lock pycocoevalcap left held is released (else Meteor.__del__ would hang) and the process is gone.
    assert not made[0].lock.locked()
    assert made[0].meteor_p.returncode is not None
