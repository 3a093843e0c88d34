"""The command `python -m kd.report` (its code: :mod:`kd.analysis.report`)."""

import sys

from kd.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
