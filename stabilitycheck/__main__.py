"""`python -m stabilitycheck ...`: the `stabilitycheck` command, for an environment whose scripts are
not on PATH."""

import sys

from stabilitycheck.cli import main

sys.exit(main())
