"""`python -m mm` runs the `mm` command line."""

import sys

from mm.app.cli import main

if __name__ == "__main__":  # not when a spawned process (the demo's background section) imports this module
    sys.exit(main())
