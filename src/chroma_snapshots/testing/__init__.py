"""Reusable test pieces: a local S3 server and conformance test classes.

``BackendTests`` and ``SnapshotStoreTests`` (in :mod:`.conformance`) are
pytest classes to subclass with a fixture that builds your backend or store,
like zarr's ``StoreTests``. Add ``pytest_plugins = ["chroma_snapshots.testing.fixtures"]``
to a conftest for the ``moto_server`` and ``s3_bucket`` fixtures.
"""

from __future__ import annotations

from chroma_snapshots.cli.localserver import MotoServer

__all__ = ["MotoServer"]
