"""``python -m elasticlm`` (and ``torchrun -m elasticlm train ...``)."""

import sys

from .cli import main

sys.exit(main())
