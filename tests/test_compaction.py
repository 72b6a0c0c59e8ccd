"""Compaction with real chromadb: idempotent deltas, and concurrent compactors losing nothing."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from chroma_helpers import counts
from kill_points import KillAt, run_to_step
from reliability import record, runs

from chroma_snapshots import InvalidInputError, RemoteStore
from chroma_snapshots.backends.s3 import S3Backend, S3Settings
from chroma_snapshots.chroma import open_client
from chroma_snapshots.compaction import Delta, Record, applied_ids, compact
from chroma_snapshots.testing import MotoServer

WORKER = str(Path(__file__).with_name("compact_worker.py"))


@pytest.fixture
def store(moto_server: MotoServer, s3_bucket: str) -> RemoteStore:
    return RemoteStore(
        S3Backend(s3_bucket, "snaps", settings=S3Settings(endpoint_url=moto_server.endpoint_url))
    )


def _records(store: RemoteStore) -> dict[str, tuple[float, ...]]:
    with open_client(store, "db") as client:
        got = client.get_collection("receipts").get(include=["embeddings"])
        return {
            i: tuple(round(float(x), 5) for x in e)
            for i, e in zip(got["ids"], got["embeddings"], strict=True)
        }


def test_replayed_delta_changes_nothing(store: RemoteStore) -> None:
    add = Delta("d1", "receipts", tuple(Record(f"r{i}", (1.0, float(i))) for i in range(20)))
    update = Delta("d2", "receipts", (Record("r0", (9.0, 9.0)),), deletes=("r1",))
    first = compact(store, "db", [add, update])
    assert first.applied == ("d1", "d2")
    before = _records(store)
    assert len(before) == 19
    assert before["r0"] == (9.0, 9.0)
    vacuumed = compact(store, "db", [Delta("d3", "receipts", deletes=("r19",))], vacuum=True)
    assert vacuumed.info is not None
    before = _records(store)
    assert "r19" not in before
    again = compact(store, "db", [add])  # an SQS redelivery of d1, after d2 changed r0
    assert again.info is None
    assert again.skipped == ("d1",)
    assert _records(store) == before
    assert applied_ids(store.resolve("db")) == ["d1", "d2", "d3"]


def test_malformed_deltas_are_refused() -> None:
    for bad in (
        {},
        {"id": "x"},
        {"id": "x", "collection": "c", "upserts": [{"id": "a"}]},
        {"id": "x", "collection": "c", "upserts": [{"id": "a", "embedding": ["nan"]}]},
        {"id": "", "collection": "receipts"},
        ["not", "an", "object"],
        {"id": "x", "collection": "ab"},  # a name chroma refuses
        {"id": "x", "collection": "receipts", "upserts": [{"id": "a", "embedding": [1]}] * 2},
        # a misspelt field parsed as an empty delta, recorded as applied: the corrected one
        # sent again under the same id was then skipped
        {"id": "x", "collection": "receipts", "delete": ["a"]},
        {
            "id": "x",
            "collection": "receipts",
            "upserts": [{"id": "a", "embedding": [1], "documnet": "d"}],
        },
        {
            "id": "x",
            "collection": "receipts",
            "upserts": [{"id": "a", "embedding": [1], "metadatas": {"k": 1}}],
        },
    ):
        with pytest.raises(InvalidInputError):
            Delta.from_obj(bad)
    ok = Delta.from_obj(
        {
            "id": "x",
            "collection": "receipts",
            "upserts": [{"id": "a", "embedding": [1, 2]}],
            "deletes": ["b"],
        }
    )
    assert ok.upserts[0].embedding == (1.0, 2.0)


def test_a_misspelt_field_is_named() -> None:
    with pytest.raises(
        InvalidInputError, match=r"upserts\[0\] has fields it cannot have: 'documnet'"
    ):
        Delta.from_obj({"id": "x", "collection": "receipts",
                        "upserts": [{"id": "a", "embedding": [1], "documnet": "d"}]})  # fmt: skip
    with pytest.raises(InvalidInputError, match="a delta has fields it cannot have: 'delete'"):
        Delta.from_obj({"id": "x", "collection": "receipts", "delete": ["a"]})


def _documents(store: RemoteStore) -> dict[str, str | None]:
    with open_client(store, "db") as client:
        got = client.get_collection("receipts").get(include=["documents"])
        return dict(zip(got["ids"], got["documents"], strict=True))


def test_an_upsert_without_a_document_keeps_the_stored_one(store: RemoteStore) -> None:
    """An embedding's refresh without its document wiped the document (it became '')."""
    first = Delta(
        "d1", "receipts", (Record("a", (1.0, 0.0), "keep me"), Record("b", (0.0, 1.0), "b"))
    )
    compact(store, "db", [first])
    refresh = Delta("d2", "receipts", (Record("a", (0.5, 0.5)), Record("b", (0.0, 2.0), "new b"),
                                       Record("c", (2.0, 2.0))))  # fmt: skip
    assert compact(store, "db", [refresh]).applied == ("d2",)
    assert _documents(store) == {"a": "keep me", "b": "new b", "c": None}
    assert _records(store)["a"] == (0.5, 0.5)


def test_a_version_published_by_hand_keeps_redelivered_deltas_out(
    store: RemoteStore, tmp_path: Path
) -> None:
    """A publish of a change by hand (no compaction record in its manifest) erased which
    deltas the version holds: a redelivered one was applied again over newer data."""
    from chroma_snapshots.chroma import publish_client

    d1 = Delta("d1", "receipts", (Record("a", (1.0, 0.0), "first"),))
    d2 = Delta("d2", "receipts", (Record("a", (2.0, 0.0), "second"),))
    compact(store, "db", [d1])
    compact(store, "db", [d2])
    with open_client(store, "db") as client:  # by hand: one more record
        client.get_collection("receipts").add(ids=["h"], embeddings=[[3.0, 3.0]])
        publish_client(store, "db", client)
    again = compact(store, "db", [d1])  # an SQS redelivery of d1
    assert again.skipped == ("d1",)
    assert again.info is None
    assert _documents(store) == {"a": "second", "h": None}
    d3 = Delta("d3", "receipts", deletes=("h",))
    assert compact(store, "db", [d3]).applied == ("d3",)  # and the record is carried on
    assert applied_ids(store.resolve("db")) == ["d1", "d2", "d3"]


@pytest.mark.parametrize("applied", [{"d2": 1}, 5, "d2", [1, 2], {"nested": ["d2"]}])
def test_a_compaction_record_that_is_not_a_list_of_ids_is_refused(
    store: RemoteStore, tmp_path: Path, applied: object
) -> None:
    """A dict's keys were taken for applied ids (d2 skipped, never applied), an int raised
    a raw TypeError."""
    from chroma_snapshots.errors import IntegrityError

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    store.publish("db", tmp_path / "src", metadata={"compaction": {"applied": applied}})
    before = store.resolve("db").version
    with pytest.raises(IntegrityError, match=r"is not .* which deltas it holds is unknown"):
        compact(store, "db", [Delta("d2", "receipts", (Record("a", (1.0, 0.0)),))])
    assert store.resolve("db").version == before


@pytest.mark.parametrize("locked", [False, True], ids=["cas-only", "with-lease-lock"])
def test_four_compactors_lose_nothing(
    moto_server: MotoServer, s3_bucket: str, store: RemoteStore, locked: bool
) -> None:
    table = "-"
    if locked:
        table = f"locks-{uuid.uuid4().hex[:8]}"
        moto_server.client_for("dynamodb").create_table(
            TableName=table,
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "lock_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "lock_id", "AttributeType": "S"}],
        )
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, moto_server.endpoint_url, s3_bucket, str(w), "5", table],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    records = _records(store)
    expected = {f"w{w}-d{j}-r{k}" for w in range(4) for j in range(5) for k in range(10)}
    assert set(records) == expected  # every record, exactly once (ids are unique keys)
    with open_client(store, "db") as client:
        assert counts(client) == {"receipts": 200}
    assert sorted(applied_ids(store.resolve("db"))) == sorted(
        f"w{w}-d{j}" for w in range(4) for j in range(5)
    )
    if locked:
        fences = [v.metadata["compaction"]["fence"] for v in store.versions("db")]
        assert fences == sorted(fences, reverse=True)  # newest first: the fence only grows


def test_delta_snapshot_published_under_another_name(store: RemoteStore, tmp_path: Path) -> None:
    from chroma_helpers import build

    from chroma_snapshots.chroma import publish_client
    from chroma_snapshots.compaction import snapshot_deltas

    compact(store, "db", [Delta("seed", "receipts", (Record("r0", (0.0,) * 32),))])
    publish_client(
        store, "upload-42", build(tmp_path / "delta", {"receipts": 30, "other": 5}, dim=32)
    )
    deltas = snapshot_deltas(store, "upload-42")
    assert sorted(d.collection for d in deltas) == ["other", "receipts"]
    first = compact(store, "db", deltas)
    assert len(first.applied) == 2
    with open_client(store, "db") as client:
        assert counts(client) == {"receipts": 31, "other": 5}
    again = compact(store, "db", snapshot_deltas(store, "upload-42"))
    assert again.info is None  # the same delta version: skipped
    assert len(again.skipped) == 2


# The compactor's writes, in the order a publish makes them, and a read of its checkout.
COMPACTOR_STEPS = (
    "get packs",
    "put pins",
    "put packs",
    "put manifests",
    "put retired",
    "put refs",
    "delete pins",
)


def test_killed_compactor_loses_nothing_and_recovers(
    moto_server: MotoServer,
    s3_bucket: str,
    store: RemoteStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL a compactor at each step of a compaction (it waits there, so the kill lands
    exactly at that step): latest always names a sound version whose records are exactly
    those of the deltas it lists as applied; the next compactor goes on."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a killed compactor's work folder stays here
    total = runs(ci=len(COMPACTOR_STEPS), long=3 * len(COMPACTOR_STEPS))
    kills: Counter[str] = Counter()
    checked = 0
    for run in range(total):
        # the 2nd occurrence (3rd in long runs): the run has published before it dies
        target = KillAt(
            COMPACTOR_STEPS[run % len(COMPACTOR_STEPS)], 2 + run // len(COMPACTOR_STEPS)
        )
        cmd = [sys.executable, WORKER, moto_server.endpoint_url, s3_bucket, str(run), "20", "-"]
        done = run_to_step([*cmd, "--steps"], target)
        assert done.killed_at == target.kind, f"run {run} never reached {target}: {done.steps}"
        kills[target.kind] += 1
        info = store.resolve("db")  # a version exists: every run published before its kill
        assert store.verify("db", info.version).ok
        applied = applied_ids(info)
        assert f"w{run}-d0" in applied  # this run's first delta was published
        expected = {f"{d}-r{k}" for d in applied for k in range(10)}
        assert set(_records(store)) == expected
        checked += 1
    assert checked == total
    # each killed compactor's work folder (here, not in the shared /tmp) was removed by the
    # next compactor: only the last one's is left
    assert len(list(tmp_path.glob("chroma-snapshots-compact-*"))) == 1
    assert len(list(tmp_path.glob("chroma-snapshots-publish-*"))) <= 1
    assert set(kills) == set(COMPACTOR_STEPS)  # every step was killed at least once
    after = Delta("after-crashes", "receipts", (Record("after-r0", (1.0, 2.0, 3.0, 4.0)),))
    compact(store, "db", [after])
    assert "after-r0" in _records(store)
    record("crash-compactor", {"runs": total, "checked": checked, **_per_step(kills)})


def _per_step(kills: Counter[str]) -> dict[str, int]:
    return {f"killed at {kind}": n for kind, n in sorted(kills.items())}


MALFORMED = [
    ([], "a delta is a JSON object, not list"),
    ("text", "a delta is a JSON object, not str"),
    (None, "a delta is a JSON object, not nothing"),
    ({"collection": "receipts"}, "'id'"),
    ({"id": "x", "collection": "receipts", "upserts": {}}, "'upserts' must be a list"),
    ({"id": "x", "collection": "receipts", "upserts": [{"id": "a"}]}, "upserts[0].embedding"),
    (
        {"id": "x", "collection": "receipts", "upserts": [{"id": "a", "embedding": ["1"]}]},
        "upserts[0].embedding[0]",
    ),
    ({"id": "x", "collection": "receipts", "deletes": [1]}, "deletes[0]"),
    # a lone surrogate in the delta id would fail the manifest's encoding, and the batch
    ({"id": "evil-\ud800", "collection": "receipts"}, "delta id is not valid UTF-8"),
    # the manifest keeps 10,000 ids, within readers' header limit only if each is short
    ({"id": "x" * 513, "collection": "receipts"}, "more than 512 bytes of JSON"),
    ({"id": "\x01" * 86, "collection": "receipts"}, "more than 512 bytes of JSON"),  # \u0001
    (  # 1e309 as an integer literal: float() raises OverflowError
        {"id": "x", "collection": "receipts", "upserts": [{"id": "a", "embedding": [10**309]}]},
        "upserts[0].embedding[0]",
    ),
    (
        {
            "id": "x",
            "collection": "receipts",
            "upserts": [{"id": "a", "embedding": [1], "metadata": {"tags": [1.0, float("nan")]}}],
        },
        "upserts[0].metadata.tags",
    ),
    (
        {
            "id": "x",
            "collection": "receipts",
            "upserts": [{"id": "a", "embedding": [1], "metadata": {"k": {"n": 1}}}],
        },
        "upserts[0].metadata.k",
    ),
]


def test_malformed_delta_names_the_field_even_with_asserts_off() -> None:
    """The same messages in this process and under ``python -O`` (asserts stripped)."""
    for body, field in MALFORMED:
        with pytest.raises(InvalidInputError, match=re.escape(field)):
            Delta.from_obj(body)
    code = (
        "import json, sys\n"
        "from chroma_snapshots.compaction.deltas import Delta\n"
        "from chroma_snapshots.errors import InvalidInputError\n"
        "for body in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        Delta.from_obj(body)\n"
        "        print('accepted')\n"
        "    except InvalidInputError as e:\n"
        "        print(str(e).replace('\\n', ' '))\n"
    )
    bodies = json.dumps([body for body, _ in MALFORMED])
    out = subprocess.run(
        [sys.executable, "-O", "-c", code, bodies], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(MALFORMED)
    for line, (_, field) in zip(lines, MALFORMED, strict=True):
        assert field in line


def test_scalar_nan_metadata_is_left_to_chroma() -> None:
    """chroma accepts a scalar NaN or infinity in metadata (and stores null); only inside a
    list does it refuse one."""
    body = {
        "id": "x",
        "collection": "receipts",
        "upserts": [{"id": "a", "embedding": [1], "metadata": {"n": float("nan")}}],
    }
    meta = Delta.from_obj(body).upserts[0].metadata
    assert meta is not None
    assert math.isnan(float(meta["n"]))  # type: ignore[arg-type]


def test_a_delta_larger_than_one_chroma_call_is_applied_beside_its_batch(
    store: RemoteStore,
) -> None:
    """A delta of more upserts (and deletes) than chroma takes in one call (its max batch
    size, 5,461 with this sqlite) is valid: it is applied in parts. Before, chroma's
    InternalError failed the whole batch, its good deltas with it (the compactor handler
    then failed every message of the batch on each delivery, toward the dead-letter queue)."""
    big_n = 6_000
    big = Delta("big", "receipts", tuple(Record(f"b{i}", (1.0, float(i))) for i in range(big_n)))
    good = Delta("good", "receipts", (Record("g", (2.0, 2.0)),))
    done = compact(store, "db", [big, good])
    assert done.applied == ("big", "good")
    assert done.rejected == {}
    assert len(_records(store)) == big_n + 1
    gone = Delta("gone", "receipts", deletes=tuple(f"b{i}" for i in range(big_n)))
    assert compact(store, "db", [gone]).applied == ("gone",)
    assert set(_records(store)) == {"g"}
