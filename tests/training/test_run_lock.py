"""RunLock: one run per output_dir; the second fails at once naming the holder's pid; a dead holder leaves no lock."""

import os
import subprocess
import sys

import pytest

from mrgfast.common.exit_codes import IO
from mrgfast.training.distributed import DistContext
from mrgfast.training.run_lock import LOCK_NAME, OutputDirInUse, RunLock, output_dir_lock

# Another process holding the lock: it writes its pid and says so, then waits to be killed.
HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
        "time.sleep(60)")


def test_a_second_lock_fails_naming_the_holder_and_a_released_one_is_taken(tmp_path):
    with RunLock(tmp_path / "out") as first:
        assert (tmp_path / "out" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputDirInUse, match=f"output_dir {tmp_path / 'out'} is in use by pid {os.getpid()}") \
                as info:
            RunLock(tmp_path / "out").acquire()
        assert info.value.exit_code == IO and first.fd is not None
    RunLock(tmp_path / "out").acquire().release()


def test_a_lock_held_by_another_process_and_dropped_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputDirInUse, match=f"in use by pid {holder.pid}"):
            with output_dir_lock(tmp_path, DistContext()):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_dir_lock(tmp_path, DistContext()):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"

