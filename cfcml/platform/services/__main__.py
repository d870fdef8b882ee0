"""``python -m cfcml.platform.services ...``: the same commands as ``cfcml dev ...``."""

import sys

from .dev import main

sys.exit(main())
