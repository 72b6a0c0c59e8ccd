"""Stores: the public SnapshotStore interface, RemoteStore on a Backend, the prune
claims it keeps, FallbackStore and the local cache."""
