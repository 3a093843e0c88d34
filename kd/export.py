"""The command `python -m kd.export <run folder or run id>` (its code: :mod:`kd.run.export`)."""

import sys

from kd.run.export import main

if __name__ == "__main__":
    sys.exit(main())
