"""`python -m zoo` is `tfnorm-zoo`."""

import sys

from zoo.cli import main

sys.exit(main())
