"""``python -m stagedoor_addons ...``: the ``stagedoor`` command (see ``main.py``)."""

import sys

from .main import main

sys.exit(main())
