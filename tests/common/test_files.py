"""atomic_write / atomic_write_text: the target is replaced whole or left as it was, with no temp file behind;
build_directory_once: a directory built once, the first of racing builders kept; temp names record their owner's pid,
and a directory is renamed away before it is deleted."""

import os
import shutil

import pytest

from mrgfast.common.files import (TEMP_NAME, atomic_write, atomic_write_text, build_directory_once, orphaned_temp,
                                  remove_directory, temp_path)


def umask() -> int:
    """This process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_text_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "one\n")
    assert path == tmp_path / "sub" / "a.txt" and path.read_text() == "one\n"
    atomic_write_text(path, "twö\n", fsync=True)
    assert path.read_text(encoding="utf-8") == "twö\n"
    assert os.listdir(path.parent) == ["a.txt"]


def test_a_raising_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a.bin", "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path) as temp:
            temp.write_bytes(b"half a fi")
            raise OSError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.bin"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_the_rename_is_the_only_moment_the_file_changes(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with atomic_write(path) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".a.txt.tmp-")
        temp.write_text("new")
        assert path.read_text() == "old"  # readers see the old file until the block ends
    assert path.read_text() == "new"


def test_mode_is_set_or_left_as_created(tmp_path):
    assert (atomic_write_text(tmp_path / "plain", "x").stat().st_mode & 0o777) == 0o666 & ~umask()
    for mode in (0o644, 0o600):
        assert (atomic_write_text(tmp_path / "set", "x", mode=mode).stat().st_mode & 0o777) == mode


def test_a_directory_is_not_overwritten_by_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_text(tmp_path, "x")


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "d"
    with atomic_write(final, directory=True, mode=0o755, fsync=True) as temp:
        (temp / "a").write_text("1")
        (temp / "sub").mkdir()
        (temp / "sub" / "b").write_text("2")
    assert (final / "sub" / "b").read_text() == "2" and (final.stat().st_mode & 0o777) == 0o755
    with atomic_write(final, directory=True) as temp:
        (temp / "c").write_text("3")
    assert sorted(os.listdir(final)) == ["c"] and os.listdir(tmp_path) == ["d"]


def test_a_raising_directory_write_keeps_the_old_directory(tmp_path):
    final = tmp_path / "d"
    with atomic_write(final, directory=True) as temp:
        (temp / "a").write_text("1")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(final, directory=True) as temp:
            (temp / "b").write_text("2")
            raise OSError("disk full")
    assert os.listdir(final) == ["a"] and os.listdir(tmp_path) == ["d"]


def test_a_directory_is_built_once_and_then_reused(tmp_path):
    calls = []

    def build(temp):
        calls.append(temp)
        (temp / "done.json").write_text("{}")

    target = tmp_path / "cache" / "d"
    assert build_directory_once(target, "done.json", build) == target
    assert build_directory_once(target, "done.json", build) == target
    assert len(calls) == 1 and calls[0] != target and (target.stat().st_mode & 0o777) == 0o755
    assert os.listdir(target.parent) == ["d"]


def test_a_failed_build_leaves_nothing_and_a_lost_race_keeps_the_winner(tmp_path):
    target = tmp_path / "d"

    def failing(temp):
        (temp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_directory_once(target, "done.json", failing)
    assert os.listdir(tmp_path) == []

    def racing(temp):
        # Another process finishes the same directory while this one builds: its rename then fails.
        target.mkdir()
        (target / "done.json").write_text("winner")
        (temp / "done.json").write_text("loser")

    assert build_directory_once(target, "done.json", racing) == target
    assert (target / "done.json").read_text() == "winner" and os.listdir(tmp_path) == ["d"]


def test_temp_names_carry_their_owner_and_only_orphans_count_as_stale(tmp_path):
    temp = temp_path(tmp_path / "step-000002", "tmp")
    assert TEMP_NAME.match(temp.name).group("pid") == str(os.getpid())
    assert not orphaned_temp(temp.name)                                   # this process: alive
    assert orphaned_temp(".step-000002.tmp-999999999-abc123")             # no such process
    assert orphaned_temp(".step-000002.old-abc123")                       # before pids were recorded
    assert not orphaned_temp("step-000002") and not orphaned_temp(".config.yaml")
    with atomic_write(tmp_path / "a.txt") as written:
        assert TEMP_NAME.match(written.name).group("pid") == str(os.getpid())
        written.write_text("x")


def test_remove_directory_renames_away_before_deleting(tmp_path, monkeypatch):
    doomed = tmp_path / "step-000001"
    doomed.mkdir()
    (doomed / "f").write_text("x")
    seen = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: seen.append(path))  # a kill here
    remove_directory(doomed)
    assert not doomed.exists() and len(seen) == 1 and TEMP_NAME.match(seen[0].name).group("kind") == "old"
