import sys

from cifarlab.cli import main

sys.exit(main())
