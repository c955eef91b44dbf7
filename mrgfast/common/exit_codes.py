"""The exit codes of mrgfast's programs (train, evaluate, onpolicy_pairs, demo), in one place, and the code an error
maps to. README: "Exit codes and faults"."""

import signal

OK = 0
UNEXPECTED = 1     # an error mrgfast did not anticipate (a bug): Python's own code for an uncaught exception
CONFIG = 2         # the configuration or the data: a bad key or value, a path naming no file, a refused resume, a
                   # malformed annotation, a missing or corrupt image, a path outside the image directory
IO = 3             # files: an unwritable or full output_dir, one in use by another run, a missing or corrupt
                   # checkpoint
NONFINITE = 4      # training went wrong numerically: a non-finite loss, gradient or weight, or divergence


def for_signal(signum: int) -> int:
    """The shell's code for a process ended by `signum` (128 + its number): 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


def exit_code_of(error: BaseException) -> int:
    """The exit code `error` ends a program with: its own `exit_code` when it declares one; else ValueError and
    FileNotFoundError -> CONFIG (mrgfast raises them for a bad value or an input path naming no file), any other
    OSError -> IO (a file that cannot be written or read), KeyboardInterrupt -> 130; anything else UNEXPECTED."""
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(error, KeyboardInterrupt):
        return for_signal(signal.SIGINT)
    if isinstance(error, (ValueError, FileNotFoundError)):
        return CONFIG
    if isinstance(error, OSError):
        return IO
    return UNEXPECTED
