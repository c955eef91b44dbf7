"""`python -m mrgfast.train`: the training command line, or with no arguments the embedded demo.

The one place that imports both: the loop (mrgfast.train) knows nothing of the demo, which trains through it.
"""

import sys

from mrgfast import demo
from mrgfast.common.program import DEBUG_FLAG
from mrgfast.train import cli


def main(argv=None) -> int:
    """No arguments (or only --debug): the embedded demo; else `config=...` and `key=value` overrides for the
    training CLI."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not [arg for arg in argv if arg != DEBUG_FLAG]:
        return demo.main(argv) or 0
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
