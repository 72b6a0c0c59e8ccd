"""The format and the engine: manifests, chunks, keys, verification, transfer, deadlines.

Nothing here knows a store; stores and operations are built from these parts.
"""
