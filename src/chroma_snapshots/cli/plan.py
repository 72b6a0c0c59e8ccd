"""What a publish would do, without doing it: ``status NAME DIR`` (which files differ from
``latest``, like ``dvc status``) and ``publish --dry-run`` (what would be uploaded)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from chroma_snapshots.cli.common import config_of, emit, human_bytes, source_of
from chroma_snapshots.cli.names import has_snapshot
from chroma_snapshots.engine.bundles import cut, read_bundles, small_limit
from chroma_snapshots.engine.chunkids import hash_of, history, publish_scheme
from chroma_snapshots.engine.chunking import DEFAULT_CHUNK_SIZE, read_chunks
from chroma_snapshots.engine.models import MANIFEST_FORMAT
from chroma_snapshots.engine.source import scan_source
from chroma_snapshots.errors import SnapshotNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable

    from chroma_snapshots.engine.models import Manifest
    from chroma_snapshots.engine.source import SourceFile
    from chroma_snapshots.stores.base import SnapshotStore


@dataclass(frozen=True)
class PublishPlan:
    """A local folder against the latest version of a name: the files that differ, and the
    new chunks (not in ``base``) a publish would upload, before compression."""

    name: str
    base: str | None
    added: list[str]
    removed: list[str]
    changed: list[str]
    files: int
    total_bytes: int
    new_chunks: int
    new_bytes: int
    reused_bytes: int
    chunk_hash: str  # what a publish would name new chunks by
    latest_chunk_hash: str | None  # what the latest's are named by (None: no chunks)

    @property
    def clean(self) -> bool:
        """Nothing differs, and a publish would upload nothing (no switch of hash)."""
        return (
            self.base is not None
            and not (self.added or self.removed or self.changed)
            and not self.new_chunks
        )


def _latest(store: SnapshotStore, name: str) -> tuple[str, Manifest] | None:
    """The latest version and its manifest; None if ``name`` has no snapshot yet."""
    try:
        version = store.current_version(name)[0]
    except SnapshotNotFoundError:
        if has_snapshot(store, name):
            raise
        return None
    return version, store.load_manifest(name, version)


def plan_publish(store: SnapshotStore, name: str, directory: str | Path) -> PublishPlan:
    """Hash ``directory`` the way publish cuts it and compare with ``name``'s latest: files
    by content (in the latest's hash), chunks to upload by the ids publish would write."""
    files, _ = scan_source(directory)
    latest = _latest(store, name)
    base, manifest = latest if latest else (None, None)
    target = getattr(store, "primary", store)  # the store a publish writes to (a fallback's)
    chunk_size = getattr(target, "chunk_size", None) or (
        manifest.chunk_size if manifest else DEFAULT_CHUNK_SIZE
    )
    bundle = getattr(target, "manifest_format", MANIFEST_FORMAT) >= 2
    fmt = MANIFEST_FORMAT if bundle else 1
    table = manifest.chunks if manifest else {}
    load = partial(store.load_manifest, name)
    ids = publish_scheme(getattr(target, "chunk_hash", None), fmt, history(manifest, base, load))
    was = hash_of(table)
    then = ids if was is None else was  # the latest's hash

    def ids_of(raw: bytes, d: str) -> tuple[str, str]:  # the id publish writes, the latest's
        return ids.key(d), then.key(d if then.name == ids.name else then.digest(raw))

    # the chunks (and starts in them) publish would give each file: bundles as it cuts them
    placed: dict[str, tuple[list[tuple[str, str]], int]] = {}
    chunks: dict[str, int] = {}
    small = [f for f in files if bundle and 0 < f.size <= small_limit(chunk_size)]
    for group in cut([(f.relpath, f.size) for f in small], chunk_size):
        members = [small[k] for k in group]
        ((raw, digest),) = read_bundles([members], ids.digest)
        pair, pos = ids_of(raw, digest), 0
        chunks[pair[0]] = len(raw)
        for f in members:
            placed[f.relpath] = ([pair], pos)
            pos += f.size
    for f in files:
        if f.relpath not in placed:
            pairs = []
            for raw in read_chunks(f.path, chunk_size, f):
                pairs.append(ids_of(raw, ids.digest(raw)))
                chunks[pairs[-1][0]] = len(raw)
            placed[f.relpath] = (pairs, 0)
    known = {ids.key(h) for h in table if ids.owns(h)}
    new = {h: n for h, n in chunks.items() if h not in known}
    return PublishPlan(
        name, base, *_changes(manifest, files, placed, then.key), len(files),
        sum(f.size for f in files), len(new), sum(new.values()),
        sum(n for h, n in chunks.items() if h in known), ids.name,
        None if was is None else was.name,
    )  # fmt: skip


def _changes(
    manifest: Manifest | None,
    files: list[SourceFile],
    placed: dict[str, tuple[list[tuple[str, str]], int]],
    key: Callable[[str], str],
) -> tuple[list[str], list[str], list[str]]:
    """Files added, removed and changed (content, start in its chunk or mode) against
    ``manifest``, whose ids ``key`` puts in the form the local ones have."""
    old = {f.path: f for f in manifest.files} if manifest else {}
    added, changed = [], []
    for f in files:
        pairs, at = placed[f.relpath]
        before = old.get(f.relpath)
        if before is None:
            added.append(f.relpath)
        elif (tuple(map(key, before.chunks)), before.at, before.mode) != (
            tuple(p[1] for p in pairs), at, f.mode,
        ):  # fmt: skip
            changed.append(f.relpath)
    return added, sorted(set(old) - {f.relpath for f in files}), changed


def describe_plan(plan: PublishPlan, directory: str) -> str:
    """The plan for people: the differing files, then one summary line."""
    against = f"latest ({plan.base})" if plan.base else "nothing (no snapshot yet)"
    lines = [f"{plan.name}: {directory} against {against}"]
    lines += [f"+ {p}" for p in plan.added]
    lines += [f"- {p}" for p in plan.removed]
    lines += [f"~ {p}" for p in plan.changed]
    was = plan.latest_chunk_hash
    if was is not None and was != plan.chunk_hash:
        lines.append(
            f"a publish would name chunks by {plan.chunk_hash}, the latest's are {was}: "
            "every chunk is uploaded again (docs/FORMAT.md)"
        )
    if plan.clean:
        lines.append("nothing differs: a publish would upload nothing new")
    else:
        lines.append(
            f"{len(plan.added)} added, {len(plan.removed)} removed, {len(plan.changed)} "
            f"changed of {plan.files} files ({human_bytes(plan.total_bytes)}); a publish "
            f"would upload {plan.new_chunks} new chunks, {human_bytes(plan.new_bytes)} before "
            f"compression, and reuse {human_bytes(plan.reused_bytes)}"
        )
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    """Add ``status`` to ``cli``."""

    @cli.command(
        help="What differs between the local folder DIRECTORY and the latest version of "
        "NAME (files added, removed, changed), and what a publish would upload. "
        "Reads only manifests; uploads nothing. A small file is compared by the bundle "
        "it is stored in: one changed lists the others of its bundle too."
    )
    @click.argument("name")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def status(ctx: click.Context, name: str, directory: str, as_json: bool) -> None:
        from chroma_snapshots.opening import check_publish_folders

        check_publish_folders(directory, config_of(ctx))  # what the publish would refuse
        plan = plan_publish(source_of(ctx), name, directory)
        emit(plan, as_json, describe_plan(plan, directory))
