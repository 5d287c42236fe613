"""python -m servekit: the same as the servekit command."""

import sys

from servekit.cli import main

sys.exit(main())
