"""`python -m supermerge ...`: the `supermerge` command (for launchers that take a module)."""

import sys

from supermerge.cli import main

sys.exit(main())
