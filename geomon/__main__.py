"""``python -m geomon ...`` runs the ``geomon`` command (:mod:`geomon.tools.cli`)."""

import sys

from geomon.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
