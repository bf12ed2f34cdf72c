"""``python -m tristage`` and ``accelerate launch -m tristage``: the ``tristage`` command (``cli.py``)."""

import sys

from tristage.cli import main

sys.exit(main())
