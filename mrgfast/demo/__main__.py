"""`python -m mrgfast.demo [demo.key=value ...]`: run the embedded demo."""

import sys

from mrgfast.demo.run import main

sys.exit(main())
