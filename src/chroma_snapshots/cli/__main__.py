"""``python -m chroma_snapshots.cli``."""

import sys

from chroma_snapshots.cli.main import main

sys.exit(main())
