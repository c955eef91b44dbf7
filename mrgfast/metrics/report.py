"""Report-generation metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) computed as R2Gen's `compute_scores` does."""

import shutil
import warnings
from typing import Callable, Optional, Sequence

REPORT_METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")

_java_warning_given = False


def java_available() -> bool:
    """Whether a `java` executable is on PATH (pycocoevalcap's METEOR runs `java -jar meteor-1.5.jar`)."""
    return shutil.which("java") is not None


def _warn_no_java() -> None:
    """Warn, once per process, that METEOR is left out because Java is missing."""
    global _java_warning_given
    if not _java_warning_given:
        _java_warning_given = True
        warnings.warn("report_metrics: `java` was not found on PATH, so METEOR (pycocoevalcap runs the METEOR 1.5 "
                      "jar) is left out of the results; install a Java runtime to report it", RuntimeWarning,
                      stacklevel=3)


def _checked_texts(texts: Sequence[str], name: str) -> list:
    """`texts` as a list of strings; anything else raises naming the argument and the index."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a sequence of strings (one per sample), got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a string, got {type(text).__name__} {text!r:.60}")
    return list(texts)


def _cleaned(texts: list, clean: Callable[[str], str], name: str) -> list:
    """Apply the caller's cleaning function to every text, checking it returns strings."""
    out = []
    for index, text in enumerate(texts):
        result = clean(text)
        if not isinstance(result, str):
            raise TypeError(f"clean({name}[{index}]) must return a string, got {type(result).__name__}")
        out.append(result)
    return out


def _meteor_safe(text: str) -> str:
    """Text the METEOR jar reads as one field of one line.

    The jar speaks a line protocol whose fields are separated by '|||': a line break inside a text would be read as
    the end of the request and shift every later answer (pycocoevalcap then fails parsing a float), and '|||' in a
    reference would split it into two references. pycocoevalcap already drops '|||' from hypotheses; doing the same
    to references and turning line breaks into spaces changes nothing else, since METEOR's `-norm` re-tokenises.
    """
    return text.replace("|||", "").replace("\r", " ").replace("\n", " ")


def _meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR from pycocoevalcap's Meteor (one JVM per call, as R2Gen does)."""
    from pycocoevalcap.meteor.meteor import Meteor

    safe_gts = {key: [_meteor_safe(text) for text in texts] for key, texts in gts.items()}
    safe_res = {key: [_meteor_safe(text) for text in texts] for key, texts in res.items()}
    scorer = Meteor()
    process = scorer.meteor_p
    try:
        score, _ = scorer.compute_score(safe_gts, safe_res)
    except (ValueError, OSError) as err:
        process.kill()
        detail = process.stderr.read().decode("utf-8", errors="replace").strip()[-2000:]
        # compute_score holds its lock when it fails; Meteor.__del__ takes the lock again and would hang.
        if scorer.lock.locked():
            scorer.lock.release()
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {err}; java stderr: {detail or '(empty)'}") \
            from err
    finally:
        # Stop the JVM now rather than whenever the scorer is garbage collected; Meteor.__del__ is then a no-op.
        try:
            process.stdin.close()
        except OSError:  # a JVM that died leaves unflushed input behind: nothing to deliver any more
            pass
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    return float(score)


def report_metrics(references: Sequence[str], hypotheses: Sequence[str],
                   clean: Optional[Callable[[str], str]] = None, meteor: bool = True) -> dict:
    """BLEU_1..BLEU_4, METEOR, ROUGE_L and CIDEr of `hypotheses` against `references`, as R2Gen computes them.

    Exactly R2Gen's `compute_scores` (pycocoevalcap `Bleu(4)`, `Meteor()`, `Rouge()` on `{i: [text]}` dicts, no PTB
    tokenizer) plus `Cider()`, so the numbers compare with published tables. Inputs should already be R2Gen-cleaned;
    pass `clean` (e.g. `mrgfast.data.text.clean_report_iu_xray`) to clean both sides here instead. The only change
    to any text is in what METEOR's jar is sent (see `_meteor_safe`). METEOR is left out (key absent) when
    `meteor=False` or, with a warning given once per process, when `java` is not on PATH. Empty hypotheses score 0.
    """
    refs = _checked_texts(references, "references")
    hyps = _checked_texts(hypotheses, "hypotheses")
    if len(refs) != len(hyps):
        raise ValueError(f"references and hypotheses must pair up one to one, got {len(refs)} references "
                         f"and {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("report_metrics needs at least one (reference, hypothesis) pair, got none")
    if clean is not None:
        if not callable(clean):
            raise TypeError(f"clean must be a callable str -> str or None, got {type(clean).__name__}")
        refs, hyps = _cleaned(refs, clean, "references"), _cleaned(hyps, clean, "hypotheses")

    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError("report_metrics needs pycocoevalcap (the scorer R2Gen uses): pip install pycocoevalcap") \
            from err

    gts = {i: [text] for i, text in enumerate(refs)}
    res = {i: [text] for i, text in enumerate(hyps)}
    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU_{n}"] = float(value)
    if meteor:
        if java_available():
            scores["METEOR"] = _meteor_score(gts, res)
        else:
            _warn_no_java()
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in REPORT_METRICS if name in scores}
