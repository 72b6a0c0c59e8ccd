from __future__ import annotations

pytest_plugins = ["chroma_snapshots.testing.fixtures", "cli_inprocess", "small_stores"]
