"""The resources: VPC, endpoints, bucket, EFS, queues, lock table, roles and the two functions.

Wired against the field failures: functions reach S3/DynamoDB/SQS through VPC endpoints (no
NAT to time out), EFS is mounted through an access point with NFS open only to the
functions, every queue has a dead-letter queue and a visibility timeout of 6x the function
timeout, event source mappings report partial batch failures, /tmp holds a snapshot plus
its next version, and the functions get only the permissions they use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws


@dataclass(frozen=True)
class Settings:
    """Sizes, timeouts and mode, from Pulumi config (with defaults for a 3 GiB snapshot)."""

    snapshot_name: str = "receipts"
    snapshot_gib: float = 3.0
    storage_mode: str = "auto"
    image_uri: str = "123456789012.dkr.ecr.us-east-1.amazonaws.com/chroma-snapshots:latest"
    azs: tuple[str, ...] = ("us-east-1a", "us-east-1b")
    query_timeout: int = 60
    query_memory: int = 3008
    compactor_timeout: int = 900
    compactor_memory: int = 4096
    batch_size: int = 10
    batch_window: int = 5
    max_receive_count: int = 5
    reserve_seconds: int = 10
    init_seconds: int = 6  # Lambda's init limit is 10 s, imports included (~2-5 s)
    tags: dict[str, str] = field(default_factory=lambda: {"app": "chroma-snapshots"})

    @classmethod
    def from_config(cls, cfg: pulumi.Config) -> Settings:
        d = cls()
        return cls(
            snapshot_name=cfg.get("snapshotName") or d.snapshot_name,
            snapshot_gib=cfg.get_float("snapshotGib") or d.snapshot_gib,
            storage_mode=cfg.get("storageMode") or d.storage_mode,
            image_uri=cfg.get("imageUri") or d.image_uri,
            azs=tuple(cfg.get_object("azs") or d.azs),
            query_timeout=cfg.get_int("queryTimeout") or d.query_timeout,
            compactor_timeout=cfg.get_int("compactorTimeout") or d.compactor_timeout,
            batch_size=cfg.get_int("batchSize") or d.batch_size,
            max_receive_count=cfg.get_int("maxReceiveCount") or d.max_receive_count,
        )

    @property
    def ephemeral_mb(self) -> int:
        """/tmp for the cached snapshot and the next version beside it (Lambda allows 10 GiB)."""
        return min(10240, max(512, int(self.snapshot_gib * 2.2 * 1024)))


def _network(s: Settings) -> dict[str, Any]:
    vpc = aws.ec2.Vpc(
        "vpc",
        cidr_block="10.42.0.0/16",
        enable_dns_hostnames=True,
        enable_dns_support=True,
        tags=s.tags,
    )
    routes = aws.ec2.RouteTable("private", vpc_id=vpc.id, tags=s.tags)
    subnets = []
    for i, az in enumerate(s.azs):
        subnet = aws.ec2.Subnet(
            f"private-{az}",
            vpc_id=vpc.id,
            availability_zone=az,
            cidr_block=f"10.42.{i}.0/24",
            tags=s.tags,
        )
        aws.ec2.RouteTableAssociation(
            f"private-{az}", subnet_id=subnet.id, route_table_id=routes.id
        )
        subnets.append(subnet)
    fn_sg = aws.ec2.SecurityGroup(
        "functions",
        vpc_id=vpc.id,
        description="chroma-snapshots functions",
        egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],
        tags=s.tags,
    )

    def only_from_functions(name: str, port: int, what: str) -> aws.ec2.SecurityGroup:
        rule = {
            "protocol": "tcp",
            "from_port": port,
            "to_port": port,
            "security_groups": [fn_sg.id],
        }
        return aws.ec2.SecurityGroup(
            name,
            vpc_id=vpc.id,
            description=f"{what} from the functions only",
            ingress=[rule],
            tags=s.tags,
        )

    nfs_sg = only_from_functions("efs", 2049, "NFS")
    https_sg = only_from_functions("endpoints", 443, "HTTPS")
    region = aws.get_region().name
    for svc in ("s3", "dynamodb"):
        aws.ec2.VpcEndpoint(
            f"{svc}-gateway",
            vpc_id=vpc.id,
            service_name=f"com.amazonaws.{region}.{svc}",
            vpc_endpoint_type="Gateway",
            route_table_ids=[routes.id],
            tags=s.tags,
        )
    aws.ec2.VpcEndpoint(
        "sqs-interface",
        vpc_id=vpc.id,
        service_name=f"com.amazonaws.{region}.sqs",
        vpc_endpoint_type="Interface",
        subnet_ids=[x.id for x in subnets],
        security_group_ids=[https_sg.id],
        private_dns_enabled=True,
        tags=s.tags,
    )
    return {"vpc": vpc, "subnets": subnets, "functions_sg": fn_sg, "nfs_sg": nfs_sg}


def _bucket(s: Settings) -> aws.s3.Bucket:
    bucket = aws.s3.Bucket("snapshots", tags=s.tags)
    aws.s3.BucketVersioning(
        "snapshots", bucket=bucket.id, versioning_configuration={"status": "Enabled"}
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        "snapshots",
        bucket=bucket.id,
        rules=[
            {
                "apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms"},
                "bucket_key_enabled": True,
            }
        ],
    )
    aws.s3.BucketPublicAccessBlock(
        "snapshots",
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
    )
    # Only what no reader can need: old versions of overwritten/deleted keys (refs, pruned
    # packs) and abandoned multipart uploads. Current objects are removed only by `prune`.
    aws.s3.BucketLifecycleConfiguration(
        "snapshots",
        bucket=bucket.id,
        rules=[
            {
                "id": "noncurrent-and-incomplete",
                "status": "Enabled",
                "filter": {},
                "noncurrent_version_expiration": {"noncurrent_days": 30},
                "abort_incomplete_multipart_upload": {"days_after_initiation": 2},
            }
        ],
    )
    return bucket


def _efs(s: Settings, net: dict[str, Any]) -> dict[str, Any]:
    fs = aws.efs.FileSystem("store", encrypted=True, tags=s.tags)
    ap = aws.efs.AccessPoint(
        "store",
        file_system_id=fs.id,
        posix_user={"uid": 1000, "gid": 1000},
        root_directory={
            "path": "/chroma",
            "creation_info": {"owner_uid": 1000, "owner_gid": 1000, "permissions": "750"},
        },
        tags=s.tags,
    )
    targets = [
        aws.efs.MountTarget(
            f"store-{i}",
            file_system_id=fs.id,
            subnet_id=subnet.id,
            security_groups=[net["nfs_sg"].id],
        )
        for i, subnet in enumerate(net["subnets"])
    ]
    return {"fs": fs, "access_point": ap, "mount_targets": targets}


def _queues(s: Settings, kind: str, timeout: int) -> dict[str, aws.sqs.Queue]:
    dlq = aws.sqs.Queue(f"{kind}-dlq", message_retention_seconds=14 * 86400, tags=s.tags)
    queue = aws.sqs.Queue(
        kind,
        visibility_timeout_seconds=6 * timeout,
        redrive_policy=dlq.arn.apply(
            lambda arn: json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": s.max_receive_count}
            )
        ),
        tags=s.tags,
    )
    return {"queue": queue, "dlq": dlq}


def _role(name: str, statements: pulumi.Input[list[dict[str, Any]]], s: Settings) -> aws.iam.Role:
    role = aws.iam.Role(
        name,
        assume_role_policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
        tags=s.tags,
    )
    aws.iam.RolePolicyAttachment(
        name,
        role=role.name,
        policy_arn=("arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"),
    )
    aws.iam.RolePolicy(
        name,
        role=role.id,
        policy=pulumi.Output.from_input(statements).apply(
            lambda st: json.dumps({"Version": "2012-10-17", "Statement": st})
        ),
    )
    return role


def _policies(
    bucket: aws.s3.Bucket, efs: dict[str, Any], queues: dict[str, Any], table: aws.dynamodb.Table
) -> dict[str, pulumi.Output[list[dict[str, Any]]]]:
    sqs_actions = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueUrl",
    ]

    def build(arns: list[str], writer: bool) -> list[dict[str, Any]]:
        bucket_arn, fs_arn, ap_arn, queue_arn, table_arn = arns
        s3 = ["s3:GetObject"] + (["s3:PutObject", "s3:DeleteObject"] if writer else [])
        efs_actions = ["elasticfilesystem:ClientMount"] + (
            ["elasticfilesystem:ClientWrite"] if writer else []
        )
        out = [
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": bucket_arn},
            {"Effect": "Allow", "Action": s3, "Resource": f"{bucket_arn}/*"},
            {
                "Effect": "Allow",
                "Action": efs_actions,
                "Resource": fs_arn,
                "Condition": {"StringEquals": {"elasticfilesystem:AccessPointArn": ap_arn}},
            },
            {"Effect": "Allow", "Action": sqs_actions, "Resource": queue_arn},
        ]
        if writer:
            out.append(
                {
                    "Effect": "Allow",
                    "Resource": table_arn,
                    "Action": [
                        "dynamodb:GetItem",
                        "dynamodb:PutItem",
                        "dynamodb:UpdateItem",
                        "dynamodb:DeleteItem",
                    ],
                }
            )
        return out

    def for_(kind: str, writer: bool) -> pulumi.Output[list[dict[str, Any]]]:
        return pulumi.Output.all(
            bucket.arn, efs["fs"].arn, efs["access_point"].arn, queues[kind]["queue"].arn, table.arn
        ).apply(lambda arns: build(list(arns), writer))

    return {"query": for_("query", False), "compaction": for_("compaction", True)}


def environment(s: Settings, bucket: str, table: str | None, mirror: bool) -> dict[str, str]:
    """The library's configuration for a function (parsed by LambdaConfig.from_env)."""
    env = {
        "CHROMADB_STORAGE_MODE": s.storage_mode,
        "CHROMADB_BUCKET": bucket,
        "CHROMA_ROOT": "/mnt/chroma/store",
        "CHROMA_SNAPSHOTS_NAME": s.snapshot_name,
        "CHROMA_SNAPSHOTS_CACHE_DIR": "/tmp/chroma-snapshots",
        "CHROMA_SNAPSHOTS_CACHE_MAX_BYTES": str(int(s.ephemeral_mb * 0.9) << 20),
        "CHROMA_SNAPSHOTS_EFS_TIMEOUT": "5",
        "CHROMA_SNAPSHOTS_RESERVE_SECONDS": str(s.reserve_seconds),
        "CHROMA_SNAPSHOTS_RELEASE_UNPROCESSED": "true",
        "CHROMA_SNAPSHOTS_MIRROR": "true" if mirror else "false",
    }
    if table:
        env["CHROMA_SNAPSHOTS_LOCK_TABLE"] = table
    else:  # the reader: check the snapshot out during init (imports + this < 10 s)
        env["CHROMA_SNAPSHOTS_INIT_SECONDS"] = str(s.init_seconds)
    return env


def build(s: Settings) -> dict[str, Any]:
    """Every resource; returns the ones tests and exports look at."""
    net = _network(s)
    bucket = _bucket(s)
    efs = _efs(s, net)
    table = aws.dynamodb.Table(
        "locks",
        billing_mode="PAY_PER_REQUEST",
        hash_key="lock_id",
        attributes=[{"name": "lock_id", "type": "S"}],
        ttl={"attribute_name": "ttl", "enabled": True},
        tags=s.tags,
    )
    queues = {
        "query": _queues(s, "query", s.query_timeout),
        "compaction": _queues(s, "compaction", s.compactor_timeout),
    }
    policies = _policies(bucket, efs, queues, table)
    functions, mappings = {}, {}
    specs = {
        "query": ("chroma_snapshots.aws_lambda.query.handler", s.query_timeout, s.query_memory),
        "compaction": (
            "chroma_snapshots.aws_lambda.compactor.handler",
            s.compactor_timeout,
            s.compactor_memory,
        ),
    }
    for kind, (handler, timeout, memory) in specs.items():
        writer = kind == "compaction"
        env = pulumi.Output.all(bucket.bucket, table.name).apply(
            lambda v, w=writer: environment(s, v[0], v[1] if w else None, mirror=w)
        )
        fn = aws.lambda_.Function(
            kind,
            package_type="Image",
            image_uri=s.image_uri,
            image_config={"commands": [handler]},
            role=_role(f"{kind}-role", policies[kind], s).arn,
            timeout=timeout,
            memory_size=memory,
            ephemeral_storage={"size": s.ephemeral_mb},
            vpc_config={
                "subnet_ids": [x.id for x in net["subnets"]],
                "security_group_ids": [net["functions_sg"].id],
            },
            file_system_config={"arn": efs["access_point"].arn, "local_mount_path": "/mnt/chroma"},
            environment={"variables": env},
            tags=s.tags,
            opts=pulumi.ResourceOptions(depends_on=efs["mount_targets"]),
        )
        mappings[kind] = aws.lambda_.EventSourceMapping(
            kind,
            event_source_arn=queues[kind]["queue"].arn,
            function_name=fn.arn,
            batch_size=s.batch_size,
            maximum_batching_window_in_seconds=s.batch_window,
            function_response_types=["ReportBatchItemFailures"],
        )
        functions[kind] = fn
    return {
        "bucket": bucket,
        "queues": {k: v["queue"] for k, v in queues.items()},
        "dlqs": {k: v["dlq"] for k, v in queues.items()},
        "functions": functions,
        "mappings": mappings,
        "efs": efs,
        "network": net,
        "table": table,
        "policies": policies,
        "settings": s,
    }
