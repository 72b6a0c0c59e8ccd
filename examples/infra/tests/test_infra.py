"""Offline unit tests of the infrastructure program with Pulumi's mocks (no cloud, no CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pulumi

sys.path.insert(0, str(Path(__file__).parent.parent))


class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        outputs = dict(args.inputs)
        outputs.setdefault("arn", f"arn:aws:mock:us-east-1:123456789012:{args.typ}/{args.name}")
        outputs.setdefault("name", args.name)
        if args.typ == "aws:s3/bucket:Bucket":
            outputs.setdefault("bucket", f"{args.name}-bucket")
        if args.typ == "aws:sqs/queue:Queue":
            outputs.setdefault("url", f"https://queue.local/{args.name}")
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        if args.token == "aws:index/getRegion:getRegion":
            return {"name": "us-east-1", "region": "us-east-1", "id": "us-east-1"}
        return {}


pulumi.runtime.set_mocks(Mocks(), preview=False)

import infra  # noqa: E402  (the mocks must be in place first)

SETTINGS = infra.Settings()
STACK = infra.build(SETTINGS)


@pulumi.runtime.test
def test_queues_have_dlqs_and_long_enough_visibility() -> Any:
    timeouts = {"query": SETTINGS.query_timeout, "compaction": SETTINGS.compactor_timeout}

    def check(args: list[Any]) -> None:
        for kind, (visibility, redrive, fn_timeout) in zip(
            timeouts, [args[0:3], args[3:6]], strict=True
        ):
            assert visibility >= 6 * fn_timeout, kind
            policy = json.loads(redrive)
            assert policy["maxReceiveCount"] == SETTINGS.max_receive_count
            assert policy["deadLetterTargetArn"].endswith(f"{kind}-dlq")

    parts = []
    for kind in timeouts:
        q = STACK["queues"][kind]
        parts += [q.visibility_timeout_seconds, q.redrive_policy, STACK["functions"][kind].timeout]
    return pulumi.Output.all(*parts).apply(check)


@pulumi.runtime.test
def test_every_function_subnet_has_a_mount_target_and_nfs_is_only_from_functions() -> Any:
    net, efs = STACK["network"], STACK["efs"]
    fn = STACK["functions"]["query"]

    def check(args: list[Any]) -> None:
        fn_subnets, target_subnets, ingress, fn_sg_id = args
        assert set(fn_subnets["subnet_ids"]) <= set(target_subnets)
        assert len(target_subnets) >= 2
        assert [(r["from_port"], r["to_port"]) for r in ingress] == [(2049, 2049)]
        assert ingress[0]["security_groups"] == [fn_sg_id]
        assert not ingress[0].get("cidr_blocks")

    return pulumi.Output.all(
        fn.vpc_config,
        [t.subnet_id for t in efs["mount_targets"]],
        net["nfs_sg"].ingress,
        net["functions_sg"].id,
    ).apply(check)


@pulumi.runtime.test
def test_event_source_mappings_report_partial_failures() -> Any:
    def check(args: list[Any]) -> None:
        for response_types, batch_size, source in zip(
            args[0::3], args[1::3], args[2::3], strict=True
        ):
            assert response_types == ["ReportBatchItemFailures"]
            assert batch_size == SETTINGS.batch_size
            assert not source.endswith("-dlq")  # the main queue, not its DLQ

    parts = []
    for m in STACK["mappings"].values():
        parts += [m.function_response_types, m.batch_size, m.event_source_arn]
    return pulumi.Output.all(*parts).apply(check)


@pulumi.runtime.test
def test_least_privilege() -> Any:
    def check(args: list[Any]) -> None:
        reader, writer = args
        reader_actions = {a for st in reader for a in st["Action"]}
        writer_actions = {a for st in writer for a in st["Action"]}
        assert "s3:PutObject" not in reader_actions
        assert "s3:DeleteObject" not in reader_actions
        assert not any(a.startswith("dynamodb:") for a in reader_actions)
        assert {"s3:PutObject", "s3:DeleteObject", "dynamodb:PutItem"} <= writer_actions
        for statements in (reader, writer):
            for st in statements:
                assert "*" not in json.dumps(st["Resource"]).replace("/*", "")  # scoped ARNs

    return pulumi.Output.all(STACK["policies"]["query"], STACK["policies"]["compaction"]).apply(
        check
    )


@pulumi.runtime.test
def test_environment_parses_with_the_library_and_tmp_is_big_enough() -> Any:
    from chroma_snapshots.config import LambdaConfig

    def check(args: list[Any]) -> None:
        for env, storage in zip(args[0::2], args[1::2], strict=True):
            cfg = LambdaConfig.from_env(env["variables"])
            assert cfg.name == SETTINGS.snapshot_name
            assert cfg.store.url == "efs:///mnt/chroma/store"
            assert cfg.store.fallback_url == f"s3://{env['variables']['CHROMADB_BUCKET']}"
            assert storage["size"] * (1 << 20) >= 2 * SETTINGS.snapshot_gib * (1 << 30)
            assert cfg.store.cache_max_bytes is not None
            assert cfg.store.cache_max_bytes <= storage["size"] << 20
        assert "CHROMA_SNAPSHOTS_LOCK_TABLE" in args[2]["variables"]
        assert float(args[0]["variables"]["CHROMA_SNAPSHOTS_INIT_SECONDS"]) < 10  # init limit
        assert LambdaConfig.from_env(args[0]["variables"]).init_seconds > 0

    fns = STACK["functions"]
    return pulumi.Output.all(
        fns["query"].environment,
        fns["query"].ephemeral_storage,
        fns["compaction"].environment,
        fns["compaction"].ephemeral_storage,
    ).apply(check)


@pulumi.runtime.test
def test_the_library_deployment_checks_pass() -> Any:
    """chroma_snapshots.aws_lambda.checks (doctor --lambda) on what this program declares."""
    from chroma_snapshots.aws_lambda.checks import Deployment, check

    snapshot_bytes = int(SETTINGS.snapshot_gib * (1 << 30))

    def check_all(args: list[Any]) -> None:
        for kind, (timeout, storage, visibility, redrive, response_types) in zip(
            ("query", "compaction"), [args[0:5], args[5:10]], strict=True
        ):
            d = Deployment(
                function=kind,
                timeout=timeout,
                ephemeral_mb=storage["size"],
                queue=kind,
                visibility_timeout=visibility,
                redrive_policy=json.loads(redrive),
                response_types=response_types,
                snapshot_bytes=snapshot_bytes,
            )
            failed = [f.detail for f in check(d) if not f.ok]
            assert failed == [], kind

    parts = []
    for kind in ("query", "compaction"):
        fn, q, m = STACK["functions"][kind], STACK["queues"][kind], STACK["mappings"][kind]
        parts += [
            fn.timeout,
            fn.ephemeral_storage,
            q.visibility_timeout_seconds,
            q.redrive_policy,
            m.function_response_types,
        ]
    return pulumi.Output.all(*parts).apply(check_all)
