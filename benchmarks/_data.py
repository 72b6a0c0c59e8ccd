"""Chroma-shaped test data for the benchmarks: a SQLite file of embedding rows plus HNSW-like
segment folders, and scattered page-sized changes like the ones SQLite and HNSW make."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from pathlib import Path

MiB = 1 << 20
DIM = 384


def build_database(path: Path, rows: int, seed: int = 0) -> None:
    """A SQLite file of ``rows`` documents, each with a DIM-d float32-sized vector blob.

    The blobs are random bytes: real embeddings barely compress either, and generating
    them this way keeps a 3 GiB build to a minute."""
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("CREATE TABLE embeddings (id TEXT PRIMARY KEY, document TEXT, vector BLOB)")
    for lo in range(0, rows, 10_000):
        db.executemany(
            "INSERT INTO embeddings VALUES (?, ?, ?)",
            (
                (
                    f"doc-{i}",
                    f"receipt {i} merchant {rng.randrange(500)} total {rng.random() * 100:.2f}",
                    rng.randbytes(DIM * 4),
                )
                for i in range(lo, min(lo + 10_000, rows))
            ),
        )
    db.commit()
    db.close()


def make_chroma_dir(root: Path, size: int, segments: int = 2, seed: int = 0) -> None:
    """A tree of about ``size`` bytes: chroma.sqlite3 (~30%) plus ``segments`` HNSW folders."""
    root.mkdir(parents=True)
    build_database(root / "chroma.sqlite3", rows=max(1, int(size * 0.3) // 1700), seed=seed)
    rng = random.Random(seed)
    per = max(4096, (size - (root / "chroma.sqlite3").stat().st_size) // segments)
    for i in range(segments):
        seg = root / f"{i:08x}-{seed:04x}-segment"
        seg.mkdir()
        with open(seg / "data_level0.bin", "wb") as f:
            for start in range(0, per, 16 * MiB):
                f.write(rng.randbytes(min(16 * MiB, per - start)))
        for name, n in (
            ("header.bin", 100),
            ("length.bin", 4000),
            ("link_lists.bin", 8000),
            ("index_metadata.pickle", 2000),
        ):
            (seg / name).write_bytes(rng.randbytes(n))


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def tree_digest(root: Path) -> str:
    """One sha256 over every file's path and bytes: equal trees, equal digests."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def change_pages(root: Path, fraction: float, seed: int = 2) -> int:
    """Overwrite scattered 4 KiB pages, ``fraction`` of all bytes; returns bytes changed."""
    rng = random.Random(seed)
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.stat().st_size >= 4096]
    total = sum(p.stat().st_size for p in files)
    changed = 0
    while changed < total * fraction:
        p = rng.choice(files)
        with open(p, "r+b") as f:
            f.seek(rng.randrange(p.stat().st_size // 4096) * 4096)
            f.write(rng.randbytes(4096))
        changed += 4096
    return changed
