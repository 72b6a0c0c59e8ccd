"""What the CLI's commands print: version listings, the chroma view, publish summaries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from chroma_snapshots.cli.common import emit, human_bytes, shown
from chroma_snapshots.cli.names import version_ids
from chroma_snapshots.errors import IntegrityError, SnapshotNotFoundError

if TYPE_CHECKING:
    from chroma_snapshots.engine.models import SnapshotInfo
    from chroma_snapshots.stores.base import SnapshotStore


def chroma_info(store: SnapshotStore, name: str, ref: str, as_json: bool) -> None:
    import tempfile

    from chroma_snapshots.chroma import describe

    with tempfile.TemporaryDirectory(prefix="chroma-snapshots-info-") as tmp:
        snap = store.checkout(name, ref, Path(tmp) / "db")
        view = describe(snap.path)
    rows = [f"{'collection':<32} {'records':>9} {'dim':>5} {'unsynced':>9} {'segments':>10}"]
    rows += [
        f"{c.name:<32} {c.records:>9} {c.dimension or '-':>5} {c.unsynced:>9} "
        f"{human_bytes(c.segment_bytes):>10}"
        for c in view.collections
    ]
    rows.append(
        f"sqlite {human_bytes(view.sqlite_bytes)}; orphan segment folders: "
        f"{', '.join(view.orphan_segments) or 'none'}"
    )
    emit({"version": snap.info.version, "chroma": view}, as_json, "\n".join(rows))


def version_rows(
    refs: dict[str, str], versions: list[SnapshotInfo], damaged: dict[str, str]
) -> str:
    """One line per version, newest first: id, date, size, files, refs naming it, message;
    a version whose manifest is unreadable says so."""
    tags = {v: sorted(r for r, rv in refs.items() if rv == v) for v in refs.values()}
    rows = {
        v.version: f"{v.created_at:%Y-%m-%d %H:%M:%S}  {human_bytes(v.total_size):>10}  "
        f"{v.file_count:>6} files  {','.join(tags.get(v.version, [])):<12}  {shown(v.message)}"
        for v in versions
    }
    rows.update((v, f"DAMAGED {' '.join([*tags.get(v, []), why])}") for v, why in damaged.items())
    return "\n".join(f"{v}  {rows[v]}".rstrip() for v in sorted(rows, reverse=True))


def listing(
    store: SnapshotStore, name: str, refs: dict[str, str]
) -> tuple[list[SnapshotInfo], dict[str, str]]:
    """The versions of ``name`` (listed, or named by a ref) and, apart, those whose
    manifest is unreadable or missing, with why: one damaged version must not hide the
    others, nor the one to roll back to."""
    found, damaged = [], {}
    for v in dict.fromkeys([*version_ids(store, name), *sorted(set(refs.values()))]):
        try:
            found.append(store.resolve(name, v))
        except (IntegrityError, SnapshotNotFoundError) as e:
            damaged[v] = str(e)
    return found, damaged


def published_text(info: SnapshotInfo, *, unchanged: bool) -> str:
    s = info.stats
    if unchanged:
        return (
            f"nothing changed since latest {info.version} of {info.name}: no new version "
            "(--allow-empty makes one)"
        )
    return (
        f"published {info.name} {info.version}: {info.file_count} files, "
        f"{human_bytes(info.total_size)}; uploaded {human_bytes(s.bytes_uploaded)} "
        f"({s.chunks_transferred} new chunks), reused {human_bytes(s.bytes_reused)}"
    )
