"""`python -m cryoflex` runs the command line."""

import sys

from cryoflex.cli import main

sys.exit(main())
