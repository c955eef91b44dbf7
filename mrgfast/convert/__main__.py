"""`python -m mrgfast.convert <format> SRC OUT [key=value ...]`: another project's checkpoint -> mrgfast's."""

import sys

from mrgfast.common.program import run_program
from mrgfast.config import ConfigError
from mrgfast.convert import minigptv2

CONVERTERS = {minigptv2.FORMAT: minigptv2.main}


def convert(argv: list) -> int:
    """Dispatch to the converter the first argument names."""
    if not argv or argv[0] not in CONVERTERS:
        given = f"got {argv[0]!r}" if argv else "got none"
        raise ConfigError(f"expected a format first, one of {sorted(CONVERTERS)} ({given}); e.g. "
                          "python -m mrgfast.convert minigptv2 minigptv2_checkpoint.pth runs/minigptv2")
    return CONVERTERS[argv[0]](argv[1:])


def main(argv=None) -> int:
    """Command-line entry: an error is one line and its exit code (mrgfast.common.program)."""
    return run_program("convert", convert, argv)


if __name__ == "__main__":
    sys.exit(main())
