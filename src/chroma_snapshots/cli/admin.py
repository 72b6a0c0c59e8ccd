"""Operator commands of the CLI: diff, verify, tag, rollback, prune, sync."""

from __future__ import annotations

from typing import Any

import click

from chroma_snapshots.cli.common import (
    age_option,
    config_of,
    count_option,
    emit,
    human_bytes,
    source_of,
    store_of,
)
from chroma_snapshots.cli.names import (
    about,
    check_new_tag,
    has_snapshot,
    no_snapshot,
    resolve_ref,
)
from chroma_snapshots.engine.chunkids import hash_of, short_id
from chroma_snapshots.engine.models import Manifest, file_key
from chroma_snapshots.errors import IntegrityError
from chroma_snapshots.stores.base import ANY, Expected


def diff_manifests(old: Manifest, new: Manifest) -> dict[str, Any]:
    """Files added, removed and changed between two manifests, and the bytes of new chunks.
    Files are compared by chunk ids: across a switch of hash (``chunk_hashes`` differ)
    every file with content is listed as changed, the same bytes or not."""
    a, b = {f.path: f for f in old.files}, {f.path: f for f in new.files}
    changed = sorted(
        # chunks, mode, or where in its chunk (a bundled file: also when its bundle changed)
        p
        for p in set(a) & set(b)
        if file_key(a[p]) != file_key(b[p])  # ids of either length
    )
    before = {short_id(h) for h in old.chunks}
    fresh = [h for h in new.chunks if short_id(h) not in before]
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": changed,
        "new_chunks": len(fresh),
        "new_chunk_bytes": sum(new.chunks[h].size for h in fresh),
        "new_stored_bytes": sum(new.chunks[h].length for h in fresh),
        "chunk_hashes": [_hash_of(old), _hash_of(new)],
    }


def _hash_of(m: Manifest) -> str | None:
    """The hash ``m`` names chunks by (None: it has none)."""
    scheme = hash_of(m.chunks)
    return None if scheme is None else scheme.name


def _switch_line(a: str | None, b: str | None) -> list[str]:
    if a is None or b is None or a == b:
        return []
    return [f"A names chunks by {a}, B by {b}: files are compared by chunk id, so every "
            "file with content is listed as changed"]  # fmt: skip


def register(cli: click.Group) -> None:
    """Add the operator commands to ``cli``."""
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

    @cli.command(
        help="Files and chunks that differ between versions A and B of NAME (a small file "
        "by the bundle it is stored in: one changed lists the others of its bundle too)."
    )
    @click.argument("name")
    @click.argument("a")
    @click.argument("b", default="latest")
    @json_opt
    @click.pass_context
    def diff(ctx: click.Context, name: str, a: str, b: str, as_json: bool) -> None:
        source = source_of(ctx)
        with about(source, name):
            old, new = (
                source.load_manifest(
                    name, source.resolve(name, resolve_ref(source, name, r)).version
                )
                for r in (a, b)
            )
        d = diff_manifests(old, new)
        emit(
            d,
            as_json,
            "\n".join(
                [f"+ {p}" for p in d["added"]]
                + [f"- {p}" for p in d["removed"]]
                + [f"~ {p}" for p in d["changed"]]
                + _switch_line(*d["chunk_hashes"])
                + [
                    f"{d['new_chunks']} new chunks, {human_bytes(d['new_chunk_bytes'])} "
                    f"({human_bytes(d['new_stored_bytes'])} stored)"
                ]
            ),
        )

    @cli.command(help="Download and check every pack and chunk of a version (exit 5 if damaged).")
    @click.argument("name")
    @click.argument("ref", default="latest")
    @json_opt
    @click.pass_context
    def verify(ctx: click.Context, name: str, ref: str, as_json: bool) -> None:
        store = store_of(ctx)
        with about(store, name):
            report = store.verify(name, store.resolve(name, resolve_ref(store, name, ref)).version)
        emit(
            report,
            as_json,
            f"{report.version}: {report.packs_checked} packs, "
            f"{report.chunks_checked} chunks, {human_bytes(report.bytes_checked)}: "
            + ("ok" if report.ok else "; ".join(report.problems)),
        )
        if not report.ok:
            raise IntegrityError(f"{name} {report.version} is damaged")

    @cli.command(
        help="Point TAG at the version REF names (compare-and-swap: the tag must be new "
        "unless --move)."
    )
    @click.argument("name")
    @click.argument("tag")
    @click.argument("ref", default="latest")
    @click.option("--move", is_flag=True, help="Move an existing tag.")
    @click.option(
        "--force",
        is_flag=True,
        help="Write the tag whatever it holds, even if it cannot be read (damaged, or "
        "signed with another key).",
    )
    @json_opt
    @click.pass_context
    def tag(
        ctx: click.Context, name: str, tag: str, ref: str, move: bool, force: bool, as_json: bool
    ) -> None:
        store = store_of(ctx)
        with about(store, name):
            version = store.resolve(name, resolve_ref(store, name, ref)).version
        from chroma_snapshots.stores.refs import to_move  # not at start-up: --help, --version

        # with --force, an unreadable tag is written over (as for a new one)
        previous = to_move(lambda: store.refs(name).get(tag), ANY if force else None)
        if previous is None:
            check_new_tag(store, name, tag)
        expected: Expected = ANY if force else previous if move else None
        store.set_ref(name, tag, version, expected=expected)
        data = {"name": name, "ref": tag, "version": version, "previous": previous}
        emit(data, as_json, f"{name}/{tag} -> {version}")

    @cli.command(help="Point latest back at VERSION (or a tag), if latest has not moved meanwhile.")
    @click.argument("name")
    @click.argument("ref")
    @click.option(
        "--force",
        is_flag=True,
        help="Write latest even if it cannot be read (damaged, or signed with another key); "
        "no compare-and-swap.",
    )
    @json_opt
    @click.pass_context
    def rollback(ctx: click.Context, name: str, ref: str, force: bool, as_json: bool) -> None:
        store = store_of(ctx)
        with about(store, name):
            from chroma_snapshots.stores.refs import to_move

            # the ref alone: a latest whose manifest is damaged is what a rollback is for
            current = to_move(lambda: store.current_version(name)[0], ANY if force else None)
            target = store.resolve(name, resolve_ref(store, name, ref)).version
        store.set_ref(name, "latest", target, expected=ANY if force else current)
        data = {"name": name, "ref": "latest", "version": target, "previous": current}
        emit(data, as_json, f"{name}/latest: {current} -> {target}")

    @cli.command(
        help="Delete old unreferenced versions and unused packs (a dry run unless --apply)."
    )
    @click.argument("name")
    @click.option(
        "--keep-last",
        default="10",
        show_default=True,
        metavar="N",
        callback=count_option,
        help="Versions to keep per name.",
    )
    @click.option(
        "--min-age",
        default="3600",
        show_default=True,
        metavar="SECONDS",
        callback=age_option,
        help="Grace period in seconds.",
    )
    @click.option("--apply", "really", is_flag=True, help="Delete; without it only report.")
    @json_opt
    @click.pass_context
    def prune(
        ctx: click.Context, name: str, keep_last: int, min_age: float, really: bool, as_json: bool
    ) -> None:
        store = store_of(ctx)
        report = store.prune(name, keep_last=keep_last, min_age=min_age, dry_run=not really)
        touched = report.kept_versions or report.deleted_versions or report.deleted_packs
        if not touched and not has_snapshot(store, name):
            raise no_snapshot(name)
        verb = "would delete" if report.dry_run else "deleted"
        text = (
            f"{verb} {len(report.deleted_versions)} versions and "
            f"{len(report.deleted_packs)} packs ({human_bytes(report.freed_bytes)}); "
            f"kept {len(report.kept_versions)}"
        )
        if report.swept_temp_files:
            removed = "would remove" if report.dry_run else "removed"
            text += f"; {removed} {report.swept_temp_files} temp files killed writers left"
        emit(report, as_json, text)

    @cli.command(
        help="Copy versions and refs from store SRC to store DST, moving only missing packs."
    )
    @click.argument("src")
    @click.argument("dst")
    @click.argument("names", nargs=-1)
    @click.option("--all-versions", is_flag=True, help="Every version, not just what refs name.")
    @click.option(
        "--verify",
        is_flag=True,
        help="Read each version back from DST and check every chunk before its refs move.",
    )
    @json_opt
    @click.pass_context
    def sync(
        ctx: click.Context,
        src: str,
        dst: str,
        names: tuple[str, ...],
        all_versions: bool,
        verify: bool,
        as_json: bool,
    ) -> None:
        from chroma_snapshots.opening import remote_for
        from chroma_snapshots.ops.sync import move_ref, sync_version

        # both ends get the environment's keys, timeouts and endpoint; only DST may be new
        s = remote_for(config_of(ctx, src), src, create=False)
        d = remote_for(config_of(ctx, dst), dst, create=True)
        copied: dict[str, int] = {}
        plans = []
        for name in names or tuple(s.names()):
            refs = s.refs(name)
            if not refs and names and not has_snapshot(s, name):
                raise no_snapshot(name)
            wanted = (
                [v.version for v in s.versions(name)]
                if all_versions
                else sorted(set(refs.values()))
            )
            plans.append((name, refs, wanted))
        # every ref moves by compare-and-swap against what it named when the sync began,
        # and only once every version (of every name) is copied and, with --verify, checked
        before = {name: d.refs(name) for name, _, _ in plans}
        for name, _, wanted in plans:
            for version in wanted:
                copied[f"{name}/{version}"] = sync_version(
                    s, d, name, version, ref=None, verify=verify
                )
        for name, refs, _ in plans:
            for ref, version in refs.items():
                move_ref(d, name, ref, version, before[name].get(ref), None)
        emit(copied, as_json, "\n".join(f"{k}: {human_bytes(v)} copied" for k, v in copied.items()))
