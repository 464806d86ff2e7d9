"""`python -m mm` runs the `mm` command line."""

import sys

from mm.app.cli import main

sys.exit(main())
