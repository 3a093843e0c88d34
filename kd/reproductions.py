"""The command `python -m kd.reproductions` (its code: :mod:`kd.analysis.reproductions`)."""

import sys

from kd.analysis.reproductions import main

if __name__ == "__main__":
    sys.exit(main())
