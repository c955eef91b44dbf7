"""Atomic writes: a file or directory is built under a temp name beside its target, then renamed over it."""

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, Path]
# `.<target>.tmp-<pid>-<hex>` (being written) / `.<target>.old-<pid>-<hex>` (being removed): the pid of the process
# that made it, so a later run removes only those whose owner is gone. Names without a pid predate it.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]+$")


def temp_path(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path` for a temp (`kind` 'tmp') or a directory being removed ('old'), owned by
    this process."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_temp(name: str) -> bool:
    """Whether `name` is a temp or old name (TEMP_NAME) whose owner process is gone (or was never recorded)."""
    match = TEMP_NAME.match(name)
    if match is None:
        return False
    pid = match.group("pid")
    return pid is None or not pid_alive(int(pid))


def remove_directory(directory: Path) -> None:
    """Delete a directory by renaming it to an `old` name owned by this process first, so that a kill halfway leaves
    a name the next run recognises and removes (orphaned_temp), never a partial directory under its own name."""
    doomed = temp_path(directory, "old")
    os.replace(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_write(path: PathLike, *, directory: bool = False, mode: Optional[int] = None,
                 fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` to write (an empty directory with `directory`): renamed over `path` when the
    block ends (given `mode` first; `fsync`: durably), removed and `path` left as it was when the block raises."""
    path = Path(path)
    if not directory and path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name rather than mkstemp / mkdtemp, whose private 0600 / 0700 mode would survive the rename.
    temp = temp_path(path, "tmp")
    if directory:
        temp.mkdir()
    try:
        yield temp
        if fsync:
            for file in sorted(p for p in temp.rglob("*") if p.is_file()) if directory else [temp]:
                fsync_file(file)
        if mode is not None:
            os.chmod(temp, mode)
        old = move_aside(path) if directory else None
        os.replace(temp, path)
        if fsync:
            fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if directory:
            shutil.rmtree(temp, ignore_errors=True)
        elif os.path.lexists(temp):
            os.remove(temp)


def atomic_write_text(path: PathLike, text: str, *, mode: Optional[int] = None, fsync: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see atomic_write); returns the path."""
    with atomic_write(path, mode=mode, fsync=fsync) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


def move_aside(directory: Path) -> Optional[Path]:
    """Rename an existing `directory` to a hidden `.<name>.old-<pid>-<hex>` beside it, returned (None when there is
    none): a rename cannot replace a non-empty directory."""
    if not directory.exists():
        return None
    old = temp_path(directory, "old")
    os.replace(directory, old)
    return old


def fsync_file(file: Path) -> None:
    """Flush a file's bytes to disk (a rename after a crash must not expose empty files)."""
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_directory_once(path: PathLike, marker: str, build: Callable[[Path], object], mode: int = 0o755) -> Path:
    """`path`, unless it already holds `marker` built by `build(temp)` under a temp name and renamed into place.

    Unlike atomic_write this never replaces a finished directory: when processes race to build the same one, the
    first rename wins and the others keep its result.
    """
    path = Path(path)
    if (path / marker).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(path, "tmp")
    temp.mkdir()
    try:
        build(temp)
        os.chmod(temp, mode)
        os.rename(temp, path)
    except OSError:
        if not (path / marker).is_file():  # not another process winning the race: a real failure
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return path
