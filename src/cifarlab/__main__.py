"""`python -m cifarlab`: the command line, as the `cifarlab` script runs it."""

import sys

from cifarlab.cli import main

sys.exit(main())
