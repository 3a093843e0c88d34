"""The command `python -m kd.registry` (its code: :mod:`kd.analysis.registry`)."""

import sys

from kd.analysis.registry import main

if __name__ == "__main__":
    sys.exit(main())
