"""Bundled AWS Lambda handlers, configured only through the environment.

- ``chroma_snapshots.aws_lambda.query.handler``: nearest-neighbour queries from SQS.
- ``chroma_snapshots.aws_lambda.compactor.handler``: compaction of deltas from SQS.

Both need the ``chroma`` extra and answer with SQS partial batch responses.

- ``chroma_snapshots.aws_lambda.powertools`` (extra ``powertools``): the same work as a
  record handler for aws-lambda-powertools' batch utilities, and Logger/Metrics bridges.
- ``chroma_snapshots.aws_lambda.checks``: deployment checks (queue visibility, dead-letter
  queue, partial batch responses, /tmp size) for a function as AWS describes it.
"""
