"""``python -m elasticlm.cli``."""

import sys

from . import main

sys.exit(main())
