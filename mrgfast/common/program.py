"""The one wrapper every mrgfast command line runs through: an anticipated error becomes one line
`mrgfast.<program>: <message>` and its exit code (mrgfast.common.exit_codes); `--debug` or MRGFAST_DEBUG=1 also
prints the traceback. An unanticipated error keeps Python's traceback and exit code 1."""

import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from mrgfast.common.exit_codes import UNEXPECTED, exit_code_of

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MRGFAST_DEBUG"


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether `--debug` is among the arguments or MRGFAST_DEBUG is set to anything but '' or '0'."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The error as one line: an OSError as '<file>: <reason>'; of a multi-line message (a DataLoader worker's
    error carries the worker's traceback) its last line, the original error."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (SIGINT); nothing saved since the last checkpoint"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if len(lines) > 1 else lines[0]


def run_program(program: str, main: Callable[[list], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(arguments without --debug)` (sys.argv by default) and return its exit code (None: 0), turning an
    anticipated error into one line on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return main([arg for arg in argv if arg != DEBUG_FLAG]) or 0
    except (Exception, KeyboardInterrupt) as error:
        code = exit_code_of(error)
        if code == UNEXPECTED:
            raise
        if debug:
            traceback.print_exc()
        print(f"mrgfast.{program}: {one_line(error)}", file=sys.stderr)
        return code
