"""Fault injection through the command lines (issue 22), on the tiny config: each fault ends in one line naming the
file, key or setting and its exit code (mrgfast.common.exit_codes), or is handled as README's "Exit codes and
faults" says. Most cases call the CLI's main() in this process (seconds); the lock, signal and kill cases run it as a
real process, with bounded waits."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrgfast import evaluate
from mrgfast.assemble import build_tokenizer, synthetic_root
from mrgfast.common.exit_codes import CONFIG, IO, NONFINITE
from mrgfast.train.cli import main
from mrgfast.training.checkpoint import read_checkpoint
from tests.tiny_run import cache  # noqa: F401 (a fixture)
from tests.tiny_run import DEMO, logged, tiny, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cli(cache, out, *extra) -> list:
    """Training-CLI arguments for the tiny config writing to `out`."""
    return [f"config={DEMO}", *tiny_overrides(cache), f"output_dir={out}", *extra]


def ran(capsys, argv, program=main) -> tuple:
    """(exit code, stdout, stderr) of a CLI main() called with `argv` in this process."""
    code = program(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fails(result, code: int, *fragments, program: str = "train") -> str:
    """Assert the CLI ended with `code` on one line `mrgfast.<program>: ...` holding every fragment (no traceback);
    returns that line."""
    got, out, err = result
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert got == code, err[-3000:]
    assert "Traceback" not in err and last.startswith(f"mrgfast.{program}: "), err[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def steps_in(out: Path) -> list:
    """The names of the step-* directories in `out`."""
    return sorted(p.name for p in out.glob("step-*"))


@pytest.fixture(scope="module")
def twin(cache, tmp_path_factory):
    """The tiny synthetic twin's root, with its tokenizer built (real-dataset cases read its iu_xray part)."""
    config = tiny(cache, tmp_path_factory.mktemp("twin"))
    root = synthetic_root(config)
    build_tokenizer(config, root)
    return root


def iu_xray(twin: Path, where: Path, edit=None) -> list:
    """Overrides for the twin's report part as a real iu_xray dataset in `where` (annotation and a copy of the
    images, so a case may damage them), the annotation passed through `edit` first."""
    images = where / "images"
    shutil.copytree(twin / "iu_xray" / "images", images)
    data = json.loads((twin / "iu_xray" / "annotation.json").read_text())
    if edit is not None:
        edit(data, images)
    annotation = where / "annotation.json"
    annotation.write_text(json.dumps(data))
    return ["data.dataset=iu_xray", f"data.path={annotation}", f"data.image_dir={images}",
            f"model.tokenizer_path={twin / 'tokenizer'}"]


# 1. Annotation paths stay inside the image directory.

def test_an_annotation_path_out_of_the_image_directory_is_refused(cache, twin, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(twin / "iu_xray" / "images" / "synth00000" / "0.png", outside / "x.png")

    def climb(data, images):
        data["train"][0]["image_path"][0] = "../../outside/x.png"

    def absolute(data, images):
        data["train"][1]["image_path"][1] = "/etc/passwd"

    for name, edit, entry in (("climb", climb, "[train][0]"), ("absolute", absolute, "[train][1]")):
        data = iu_xray(twin, tmp_path / name, edit)
        line = fails(ran(capsys, cli(cache, tmp_path / name / "run", *data)), CONFIG, f"annotation.json{entry}",
                     "outside the image directory", "data.allow_outside_image_dir")
        assert "decode" not in line and not steps_in(tmp_path / name / "run")


def test_allow_outside_image_dir_takes_absolute_paths(cache, twin, tmp_path, capsys):
    def absolute(data, images):
        data["train"][0]["image_path"][0] = str(images / "synth00000" / "0.png")

    data = iu_xray(twin, tmp_path, absolute)
    code, _, err = ran(capsys, cli(cache, tmp_path / "run", *data, "schedule.max_steps=1",
                                   "data.allow_outside_image_dir=true"))
    assert code == 0, err


# 2. and 3. Non-finite values and divergence.

def test_an_infinite_lr_never_saves_poisoned_weights(cache, tmp_path, capsys):
    for mode in ("stop", "skip"):
        out = tmp_path / mode
        fails(ran(capsys, cli(cache, out, "optim.lr=inf", "schedule.max_steps=3", "checkpoint.every_steps=1",
                              "telemetry.log_every=10", f"guard.on_nonfinite={mode}")),
              NONFINITE, "non-finite", "without saving")
        assert not steps_in(out)  # the lr is finite-looking at the save: the weights were checked


def test_divergence_stops_under_stop_and_warns_under_skip(cache, tmp_path, capsys):
    fails(ran(capsys, cli(cache, tmp_path / "stop", "optim.lr=1e30", "schedule.max_steps=3")), NONFINITE,
          "diverged", "guard.max_abs_weight")
    assert not steps_in(tmp_path / "stop")
    code, _, err = ran(capsys, cli(cache, tmp_path / "skip", "optim.lr=1e30", "schedule.max_steps=3",
                                   "guard.on_nonfinite=skip"))
    assert code == 0 and "WARNING: training diverged" in err and "skipped 1 step(s)" in err
    records = logged(tmp_path / "skip")
    assert records[-1]["skipped_steps"] == 2


# 4. Resume compares the config; config.yaml is the first run's; a schedule is extended on purpose only.

def test_resume_refuses_changed_settings_and_keeps_the_first_config(cache, tmp_path, capsys):
    base = cli(cache, tmp_path, "schedule.max_steps=2", "resume=auto")
    assert ran(capsys, base)[0] == 0
    first = (tmp_path / "config.yaml").read_text()
    fails(ran(capsys, base + ["optim.lr=0.5", "data.synthetic_n=13"]), CONFIG, "optim.lr (0.001 -> 0.5)",
          "data.synthetic_n (12 -> 13)", "resume_allow_changes=[data.synthetic_n,optim.lr]")
    fails(ran(capsys, base + ["schedule.max_steps=4"]), CONFIG, "schedule.max_steps (2 -> 4)")
    assert (tmp_path / "config.yaml").read_text() == first and not list(tmp_path.glob("config-resume-*"))
    code, out, err = ran(capsys, base + ["optim.lr=0.5", "schedule.max_steps=4",
                                         "resume_allow_changes=[optim.lr,schedule.max_steps]"])
    assert code == 0 and "resuming" in err and "optim.lr (0.001 -> 0.5)" in err, err
    assert [r["lr"] for r in logged(tmp_path)][2:] == pytest.approx([0.5 * 0.5, 0.5 * 0.5 * (1 - 2 ** -0.5) / 1])
    assert (tmp_path / "config.yaml").read_text() == first
    assert "lr: 0.5" in (tmp_path / "config-resume-000002.yaml").read_text()
    assert "lr: 0.5" in (tmp_path / "step-000004" / "config.yaml").read_text()  # what evaluate rebuilds from
    assert ran(capsys, base + ["optim.lr=0.5", "schedule.max_steps=4"])[1].startswith("mrgfast.train: nothing to train")


def test_an_extended_cosine_goes_on_along_the_longer_schedule(cache, tmp_path, capsys):
    common = ["schedule.name=cosine", "optim.lr=0.01", "resume=auto"]
    assert ran(capsys, cli(cache, tmp_path / "long", *common, "schedule.max_steps=6"))[0] == 0
    assert ran(capsys, cli(cache, tmp_path / "ext", *common, "schedule.max_steps=3"))[0] == 0
    assert ran(capsys, cli(cache, tmp_path / "ext", *common, "schedule.max_steps=6",
                           "resume_allow_changes=[schedule.max_steps]"))[0] == 0
    extended, straight = [r["lr"] for r in logged(tmp_path / "ext")], [r["lr"] for r in logged(tmp_path / "long")]
    assert extended[3:] == straight[3:]
    assert all(a >= b for a, b in zip(extended[3:], extended[4:]))  # no climb after the old end


# 5. One run per output_dir; 8. SIGTERM exits 143 after saving.

def test_a_second_run_in_a_busy_output_dir_fails_at_once_and_sigterm_exits_143(cache, tmp_path, capsys):
    args = cli(cache, tmp_path, "schedule.max_steps=100000", "checkpoint.every_steps=100000")
    proc = subprocess.Popen([sys.executable, "-m", "mrgfast.train", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(tmp_path, proc, 2)
        fails(ran(capsys, args), IO, f"output_dir {tmp_path} is in use by pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1] and "finished" not in out
    assert len(steps_in(tmp_path)) == 1
    records = logged(tmp_path)
    assert len({r["step"] for r in records}) == len(records)  # no step logged twice


def wait_for_records(out: Path, proc, count: int, timeout: float = 120) -> None:
    """Wait until the run in `proc` has logged `count` records (it must still be running)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if metrics.is_file() and metrics.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} records in {metrics} after {timeout}s")


# 6. A corrupt latest checkpoint.

def test_resume_auto_skips_a_corrupt_checkpoint_and_an_explicit_one_fails(cache, tmp_path, capsys):
    base = cli(cache, tmp_path, "schedule.max_steps=4", "checkpoint.every_steps=2", "resume=auto")
    assert ran(capsys, base)[0] == 0
    weights = tmp_path / "step-000004" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    fails(ran(capsys, cli(cache, tmp_path, "schedule.max_steps=4", "checkpoint.every_steps=2",
                          f"resume={tmp_path / 'step-000004'}")), IO, str(weights), "corrupt")
    code, _, err = ran(capsys, base)
    assert code == 0 and f"skipping step-000004, it does not verify: {weights}: corrupt" in err
    read_checkpoint(tmp_path / "step-000004")  # trained again from step 2 and saved over it
    fails(ran(capsys, cli(cache, tmp_path / "x", "resume=/nonexistent")), IO, "resume=/nonexistent",
          "not a complete checkpoint directory")


# 7. Leftovers of interrupted prunes; an older explicit resume.

def test_leftovers_of_interrupted_saves_and_prunes_are_removed(cache, tmp_path, capsys):
    partial = tmp_path / "step-000005"   # a prune killed before it renamed the directory away (older versions)
    partial.mkdir(parents=True)
    (partial / "modules.safetensors").write_bytes(b"half")
    orphan = tmp_path / ".step-000003.old-999999999-abcdef"  # a prune killed halfway: no such pid
    orphan.mkdir()
    code, _, err = ran(capsys, cli(cache, tmp_path, "schedule.max_steps=1", "resume=auto"))
    assert code == 0 and "removed what interrupted saves or prunes left" in err
    assert not partial.exists() and not orphan.exists() and steps_in(tmp_path) == ["step-000001"]


def test_kills_during_saves_and_prunes_leave_a_resumable_directory(cache, tmp_path, capsys):
    args = cli(cache, tmp_path, "schedule.max_steps=30", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
               "resume=auto")
    for kill in range(2):  # bounded: two SIGKILLs at some point of the save-and-prune cycle
        proc = subprocess.Popen([sys.executable, "-m", "mrgfast.train", *args], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_records(tmp_path, proc, 3 + 3 * kill)
        proc.kill()
        proc.wait(timeout=60)
        for step in tmp_path.glob("step-*"):
            assert (step / "manifest.json").is_file(), step  # never a partial step-* directory
    code, _, err = ran(capsys, args)
    assert code == 0, err
    assert steps_in(tmp_path) == ["step-000030"] and not list(tmp_path.glob(".step-*"))
    read_checkpoint(tmp_path / "step-000030")


def test_an_older_explicit_resume_with_later_checkpoints_is_refused(cache, tmp_path, capsys):
    assert ran(capsys, cli(cache, tmp_path, "schedule.max_steps=4", "checkpoint.every_steps=2"))[0] == 0
    fails(ran(capsys, cli(cache, tmp_path, "schedule.max_steps=4", f"resume={tmp_path / 'step-000002'}")), CONFIG,
          "holds checkpoints after step 2 (step-000004)")
    fails(ran(capsys, cli(cache, tmp_path, "schedule.max_steps=4", "resume=none")), CONFIG,
          "holds checkpoints after step 0 (step-000002, step-000004)")


# 9. One line per error, --debug / MRGFAST_DEBUG=1 for the traceback; 10. the readers' counts.

def test_bad_data_missing_and_corrupt_images_are_one_line(cache, twin, tmp_path, capsys):
    bad = iu_xray(twin, tmp_path / "bad")
    Path(bad[1].split("=", 1)[1]).write_text('{"train": [')
    fails(ran(capsys, cli(cache, tmp_path / "bad" / "run", *bad)), CONFIG, "annotation.json: invalid JSON at line 1")

    def drop(data, images):
        (images / data["train"][2]["image_path"][1]).unlink()

    missing = iu_xray(twin, tmp_path / "missing", drop)
    fails(ran(capsys, cli(cache, tmp_path / "missing" / "run", *missing)), CONFIG, "annotation.json[train][2]",
          "image file not found", str(tmp_path / "missing" / "images"))

    def damage(data, images):
        for study in images.iterdir():
            (study / "0.png").write_bytes(b"not a png")

    corrupt = iu_xray(twin, tmp_path / "corrupt", damage)
    fails(ran(capsys, cli(cache, tmp_path / "corrupt" / "run", *corrupt)), CONFIG, "failed to load",
          "cannot decode image", "0.png")


def test_unwritable_and_full_output_dirs_are_one_line(cache, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fails(ran(capsys, cli(cache, blocker / "run")), IO, f"{blocker / 'run'}: ", "Not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "metrics.jsonl").symlink_to("/dev/full")
    fails(ran(capsys, cli(cache, full, "schedule.max_steps=1")), IO, f"{full / 'metrics.jsonl'}: No space left")


def test_debug_shows_the_traceback_and_is_no_override(cache, tmp_path, capsys, monkeypatch):
    argv = cli(cache, tmp_path, "optim.lr=-1")
    code, _, err = ran(capsys, argv + ["--debug"])
    assert code == CONFIG and "Traceback" in err and err.strip().splitlines()[-1].startswith("mrgfast.train: ")
    assert "lr must be > 0" in err and "unknown config key" not in err
    monkeypatch.setenv("MRGFAST_DEBUG", "1")
    assert "Traceback" in ran(capsys, argv)[2]


def test_reader_counts_are_printed_and_logged(cache, twin, tmp_path, capsys):
    def damage(data, images):
        (images / data["train"][3]["image_path"][0]).unlink()
        data["train"][0]["report"] = " ".join(["the heart is normal ."] * 20)  # 100 words: cut to 60

    data = iu_xray(twin, tmp_path, damage)
    code, _, err = ran(capsys, cli(cache, tmp_path / "run", *data, "schedule.max_steps=1",
                                   "data.skip_bad_samples=true"))
    assert code == 0, err
    assert "read 9, kept 8, skipped_missing_image 1, truncated_report 1" in err
    first = logged(tmp_path / "run")[0]
    assert first["data"] == {"read": 9, "kept": 8, "skipped_missing_image": 1, "truncated_report": 1}


# 11. evaluate honours data.skip_bad_samples.

def test_evaluate_skips_bad_samples_when_asked_and_reports_them(cache, twin, tmp_path, capsys):
    data = iu_xray(twin, tmp_path)
    assert ran(capsys, cli(cache, tmp_path / "run", *data, "schedule.max_steps=1"))[0] == 0
    test_ids = [e["id"] for e in json.loads(Path(data[1].split("=", 1)[1]).read_text())["test"]]
    (tmp_path / "images" / test_ids[0] / "0.png").write_bytes(b"not a png")
    argv = [f"checkpoint={tmp_path / 'run' / 'step-000001'}", "max_new_tokens=3", "meteor=false"]
    fails(ran(capsys, argv, evaluate.main), CONFIG, "cannot decode image", program="evaluate")
    code, _, err = ran(capsys, argv + ["data.skip_bad_samples=true"], evaluate.main)
    assert code == 0, err
    written = json.loads((tmp_path / "run" / "step-000001" / "eval" / "eval.json").read_text())
    assert written["n_samples"] == len(test_ids) - 1 and written["data"]["skipped_corrupt_image"] == 1
