"""`python -m mrgfast.train` (mrgfast.train.__main__ and mrgfast.train.cli): no arguments run the demo, a bad key is
named with a suggestion. The CLI's SIGTERM and 2-process runs are in tests/integration."""

import types

from mrgfast.train.__main__ import main


def test_cli_without_arguments_runs_the_demo(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    import mrgfast.train.__main__ as entry
    monkeypatch.setattr(entry, "demo", fake)
    assert main([]) == 0 and calls == [[]]


def test_cli_reports_bad_keys(capsys):
    assert main(["optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err
