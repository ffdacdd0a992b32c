"""``python3 -m snapshotter [serve] --root DIR --address SOCKET``."""

import sys

from snapshotter.cli import main

sys.exit(main())
