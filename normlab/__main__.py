"""``python -m normlab`` is the ``normlab`` console script."""

import sys

from normlab.cli import main

sys.exit(main())
