"""``python -m geomon ...`` runs the ``geomon`` command (:mod:`geomon.cli`)."""

import sys

from geomon.cli import main

if __name__ == "__main__":
    sys.exit(main())
