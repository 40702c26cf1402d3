"""`python -m relaypacsd` runs the command line."""

import sys

from relaypacsd.cli import main

sys.exit(main())
