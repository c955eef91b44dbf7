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


def test_debug_alone_still_runs_the_demo_and_reaches_it(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    import mrgfast.train.__main__ as entry
    monkeypatch.setattr(entry, "demo", fake)
    assert main(["--debug"]) == 0 and calls == [["--debug"]]  # the demo's own wrapper takes --debug off


def test_a_run_stopped_by_a_signal_exits_143_and_one_already_done_says_so(monkeypatch, capsys, tmp_path):
    import mrgfast.train.cli as cli
    result = types.SimpleNamespace(stop_signal="SIGTERM", step=3, checkpoint=tmp_path / "step-000003", start_step=0)
    monkeypatch.setattr(cli, "train", lambda config: result)
    assert main(["schedule.max_steps=5"]) == 143
    assert capsys.readouterr().err == (f"mrgfast.train: stopped by SIGTERM at step 3 after saving {result.checkpoint}; "
                                       "the run is not finished (resume=auto continues it)\n")
    result.stop_signal, result.start_step = None, 3
    assert main(["schedule.max_steps=3"]) == 0
    assert capsys.readouterr().out.startswith("mrgfast.train: nothing to train")
