"""One run per output_dir: an exclusive lock on `<output_dir>/.lock`, held by the main process for the whole run."""

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from mrgfast.common.exit_codes import IO
from mrgfast.training.distributed import DistContext, any_rank

LOCK_NAME = ".lock"


class OutputDirInUse(RuntimeError):
    """Another process holds the output_dir's lock: two runs would delete each other's saves and log twice."""

    exit_code = IO

    def __init__(self, directory: Path, pid: Optional[int]):
        self.directory, self.pid = directory, pid
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"output_dir {directory} is in use by {holder} (it holds {directory / LOCK_NAME}); wait for "
                         "that run to end or choose another output_dir")


class RunLock:
    """`with RunLock(output_dir):` holds an exclusive flock on `<output_dir>/.lock` (creating the directory), with
    this process's id written inside; OutputDirInUse at once when another process holds it. The kernel drops the
    lock when the holder exits, however it ends, so a killed run never leaves the directory locked."""

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise OutputDirInUse naming the holder's pid."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_pid(fd)
            os.close(fd)
            raise OutputDirInUse(self.directory, pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would let a third process lock a different file)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_pid(fd: int) -> Optional[int]:
    """The pid written in a lock file, or None when it holds none yet."""
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def output_dir_lock(directory: Union[str, Path], ctx: DistContext) -> Iterator[None]:
    """The main process holds the output_dir's lock for the block (the other ranks are the same run); when it cannot
    take it, every rank raises (the main one OutputDirInUse, or the OSError that stopped it)."""
    lock, failure = RunLock(directory), None
    if ctx.is_main:
        try:
            lock.acquire()
        except (OutputDirInUse, OSError) as err:
            failure = err
    if any_rank(ctx, failure is not None):
        raise failure or OSError(errno.EBUSY, "the main process could not lock this output_dir", str(directory))
    try:
        yield
    finally:
        lock.release()
