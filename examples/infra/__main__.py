"""Pulumi entry point: ``pulumi up`` in this folder (see infra.py for what it builds)."""

import pulumi
from infra import Settings, build

stack = build(Settings.from_config(pulumi.Config()))
pulumi.export("bucket", stack["bucket"].bucket)
pulumi.export("query_queue_url", stack["queues"]["query"].url)
pulumi.export("delta_queue_url", stack["queues"]["compaction"].url)
