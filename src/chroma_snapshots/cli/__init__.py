"""The ``chroma-snapshots`` command line (needs the ``cli`` extra)."""

from chroma_snapshots.cli.main import main

__all__ = ["main"]
