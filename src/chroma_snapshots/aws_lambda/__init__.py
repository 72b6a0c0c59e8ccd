"""Bundled AWS Lambda handlers, configured only through the environment.

- ``chroma_snapshots.aws_lambda.query.handler``: nearest-neighbour queries from SQS.
- ``chroma_snapshots.aws_lambda.compactor.handler``: compaction of deltas from SQS.

Both need the ``chroma`` extra and answer with SQS partial batch responses.
"""
