"""run_program and exit_code_of: an anticipated error is one line and its exit code, --debug / MRGFAST_DEBUG=1 add
the traceback, an unanticipated one keeps Python's traceback."""

import errno
import signal

import pytest

from mrgfast.common.exit_codes import CONFIG, IO, UNEXPECTED, exit_code_of, for_signal
from mrgfast.common.program import run_program


class Declared(Exception):
    exit_code = 4


def raising(error):
    """A main() that raises `error`, recording the arguments it was given."""
    seen = []

    def main(argv):
        seen.append(argv)
        raise error

    return main, seen


@pytest.mark.parametrize("error, code", [
    (ValueError("x"), CONFIG), (FileNotFoundError("x"), CONFIG), (PermissionError("x"), IO), (Declared(), 4),
    (KeyboardInterrupt(), 130), (RuntimeError("x"), UNEXPECTED), (KeyError("x"), UNEXPECTED)])
def test_exit_code_of(error, code):
    assert exit_code_of(error) == code


def test_signal_codes_are_the_shells():
    assert for_signal(signal.SIGTERM) == 143 and for_signal(signal.SIGINT) == 130


def test_an_error_is_one_line_and_its_code(capsys, monkeypatch):
    monkeypatch.delenv("MRGFAST_DEBUG", raising=False)
    main, seen = raising(ValueError("data.path: no such split"))
    assert run_program("train", main, ["a=1"]) == CONFIG and seen == [["a=1"]]
    assert capsys.readouterr().err == "mrgfast.train: data.path: no such split\n"
    full = OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl")
    assert run_program("train", raising(full)[0], []) == IO
    assert capsys.readouterr().err == "mrgfast.train: /run/metrics.jsonl: No space left on device\n"
    # A DataLoader worker's error carries the worker's traceback: the original error is its last line.
    wrapped = ValueError("Caught BadSampleError in DataLoader worker process 0.\nOriginal Traceback ...\n"
                         "  File x\nmrgfast.data.errors.BadSampleError: sample 3 failed to load")
    run_program("train", raising(wrapped)[0], [])
    assert capsys.readouterr().err.endswith("BadSampleError: sample 3 failed to load\n")


def test_debug_flag_or_env_prints_the_traceback_and_is_not_passed_on(capsys, monkeypatch):
    monkeypatch.delenv("MRGFAST_DEBUG", raising=False)
    main, seen = raising(ValueError("bad"))
    assert run_program("evaluate", main, ["--debug", "k=v"]) == CONFIG and seen == [["k=v"]]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("mrgfast.evaluate: bad\n")
    monkeypatch.setenv("MRGFAST_DEBUG", "1")
    run_program("evaluate", main, [])
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MRGFAST_DEBUG", "0")
    run_program("evaluate", main, [])
    assert "Traceback" not in capsys.readouterr().err


def test_an_unanticipated_error_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run_program("train", raising(RuntimeError("a bug"))[0], [])


def test_success_and_none_are_zero():
    assert run_program("demo", lambda argv: None, []) == 0
    assert run_program("demo", lambda argv: 0, []) == 0
