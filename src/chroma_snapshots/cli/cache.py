"""``chroma-snapshots cache``: what the local cache holds (per name and per version, sizes,
last use), removing some or all of it (``--dry-run`` first), and rehashing it."""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from chroma_snapshots.cli.common import cache_of, emit, human_bytes
from chroma_snapshots.cli.names import matches_prefix
from chroma_snapshots.errors import IntegrityError, InvalidInputError, LocalDiskError

if TYPE_CHECKING:
    from chroma_snapshots.stores.cache import CachedStore
    from chroma_snapshots.stores.cache.inspect import CacheEntry


def ago(t: float, now: float | None = None) -> str:
    """'5s ago', '3m ago', '2h ago', '4d ago'; 'never' for 0."""
    if t <= 0:
        return "never"
    s = max(0.0, (now or time.time()) - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _table(found: Sequence[CacheEntry]) -> str:
    if not found:
        return "(cache is empty)"
    rows = [f"{'name':<20} {'version':<36} {'size':>10}  {'last used':<10}"]
    rows += [
        f"{e.name:<20} {e.version:<36} {human_bytes(e.size):>10}  {ago(e.last_used):<10}"
        f"{'  pinned (in use)' if e.pinned else ''}"
        for e in found
    ]
    totals: dict[str, list[int]] = {}
    for e in found:
        totals.setdefault(e.name, [0, 0])
        totals[e.name][0] += 1
        totals[e.name][1] += e.size
    rows.append("")
    rows += [f"{n}: {c} versions, {human_bytes(b)}" for n, (c, b) in sorted(totals.items())]
    rows.append(f"total: {len(found)} versions, {human_bytes(sum(e.size for e in found))}")
    return "\n".join(rows)


def _chosen(store: CachedStore, name: str | None, versions: Sequence[str]) -> list[CacheEntry]:
    """Cached entries of ``name`` (all names if None), only ``versions`` (or unique prefixes
    of them) when given; a version that is not cached is an error, before anything goes."""
    from chroma_snapshots.stores.cache.inspect import entries

    found = [e for e in entries(store) if name is None or e.name == name]
    if not versions:
        return found
    out = []
    for v in versions:
        hits = [e for e in found if matches_prefix(e.version, v)]
        if len(hits) != 1:
            what = "is not cached" if not hits else "is ambiguous"
            raise InvalidInputError(f"{name}/{v} {what} (see: chroma-snapshots cache ls)")
        out.append(hits[0])
    return out


def _remove(store: CachedStore, chosen: list[CacheEntry], dry_run: bool, as_json: bool) -> None:
    """Evict ``chosen`` (or, dry, say what would go); pinned versions stay, and so do
    versions with a file system mounted in them (LocalDiskError once the rest went)."""
    from chroma_snapshots.stores.cache.inspect import IN_USE, evict

    if dry_run:
        removed = [e for e in chosen if not e.pinned]
        why = {f"{e.name}/{e.version}": IN_USE for e in chosen if e.pinned}
    else:
        removed, why = evict(store, chosen)
    kept = [e for e in chosen if e not in removed]
    verb = "would evict" if dry_run else "evicted"
    lines = [f"{verb} {e.name}/{e.version} ({human_bytes(e.size)})" for e in removed]
    lines += [f"kept {k}: {reason}" for k, reason in why.items()]
    lines.append(f"{verb} {len(removed)} versions ({human_bytes(sum(e.size for e in removed))})")
    emit({"dry_run": dry_run, "evicted": removed, "kept": kept}, as_json, "\n".join(lines))
    mounted = [k for k, reason in why.items() if reason != IN_USE]
    if mounted:
        raise LocalDiskError(errno.EBUSY, f"not evicted: {', '.join(mounted)} (see above)")


def register(cli: click.Group) -> None:
    """Add the ``cache`` group to ``cli``."""
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    dry_opt = click.option("--dry-run", is_flag=True, help="Only say what would be evicted.")

    @cli.group(help="Inspect and manage the local cache of checked-out versions.")
    def cache() -> None:
        pass

    @cache.command(
        name="ls",
        help="Cached versions, least recently used first, with size and last use; "
        "then the total per name.",
    )
    @json_opt
    @click.pass_context
    def cache_ls(ctx: click.Context, as_json: bool) -> None:
        from chroma_snapshots.stores.cache.inspect import entries

        found = entries(cache_of(ctx))
        emit(found, as_json, _table(found))

    @cache.command(
        name="rm",
        help="Evict NAME's cached versions (all, or the VERSIONs given, by id or unique "
        "prefix). Versions a process holds open stay; so do versions with a file system "
        "mounted in them (exit 1, once the others are evicted).",
    )
    @click.argument("name")
    @click.argument("versions", nargs=-1)
    @dry_opt
    @json_opt
    @click.pass_context
    def cache_rm(
        ctx: click.Context, name: str, versions: tuple[str, ...], dry_run: bool, as_json: bool
    ) -> None:
        from chroma_snapshots.engine.validation import check_name

        check_name(name)  # "" or "../x" is bad usage (exit 2), not "nothing to remove"
        store = cache_of(ctx)
        _remove(store, _chosen(store, name, versions), dry_run, as_json)

    @cache.command(name="clear", help="Evict every cached version that no process holds open.")
    @dry_opt
    @json_opt
    @click.pass_context
    def cache_clear(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
        store = cache_of(ctx)
        _remove(store, _chosen(store, None, ()), dry_run, as_json)

    @cache.command(
        name="verify", help="Rehash every cached file against its manifest (exit 5 if any differ)."
    )
    @json_opt
    @click.pass_context
    def cache_verify(ctx: click.Context, as_json: bool) -> None:
        from chroma_snapshots.stores.cache.inspect import entries, verify

        store = cache_of(ctx)
        report = {f"{e.name}/{e.version}": verify(store, e) for e in entries(store)}
        lines = [f"{k}: {'ok' if not v else '; '.join(v)}" for k, v in report.items()]
        emit(report, as_json, "\n".join(lines) or "(cache is empty)")
        if any(report.values()):
            raise IntegrityError("cached versions differ from their manifests (see above)")
