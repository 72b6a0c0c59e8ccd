"""The ``chroma-snapshots`` command line.

Exit codes: 0 ok, 1 other SnapshotError, 2 bad usage/config/input (including a
URL typo and a write to an endpoint that ignores conditional writes), 3 not found
(including a store that does not exist: only ``publish`` and ``sync``'s
destination create one), 4 conflict (CAS lost), 5 integrity failure, 6 timeout,
7 backend unavailable.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chroma_snapshots.cli.common import (
    EXIT_CODES,
    cache_of,
    click,
    config_of,
    emit,
    human_bytes,
    progress_bar,
    source_of,
    store_of,
)
from chroma_snapshots.errors import IntegrityError, SnapshotError

if TYPE_CHECKING:
    from chroma_snapshots.stores.base import SnapshotStore


def _chroma_info(store: SnapshotStore, name: str, ref: str, as_json: bool) -> None:
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


def _build() -> click.Group:
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

    @click.group(help="Versioned, verified ChromaDB snapshots on S3, EFS and /tmp.")
    @click.option(
        "--store",
        "store_url",
        envvar=None,
        default=None,
        metavar="URL",
        help="Store URL (s3://bucket/prefix, file:///dir, efs:///mnt/x, memory://x) or a plain "
        "directory path. Replaces only the store the CHROMA_SNAPSHOTS_URL / "
        "CHROMADB_STORAGE_MODE environment names (and its fallback); every other setting "
        "(signing key, cache, timeouts, endpoint) still comes from the environment.",
    )
    @click.option(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="Serve checkouts through a local cache in DIR "
        "(default: CHROMA_SNAPSHOTS_CACHE_DIR; 'cache' commands: /tmp/chroma-snapshots).",
    )
    @click.pass_context
    def cli(ctx: click.Context, store_url: str | None, cache_dir: str | None) -> None:
        ctx.obj = {"store_url": store_url, "cache_dir": cache_dir}

    @cli.command(help="Publish DIRECTORY as a new version of NAME.")
    @click.argument("name")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option(
        "--expected",
        default=None,
        help="Version the publish is based on; 'none' if the "
        "name must be new; 'any' to overwrite unconditionally. Default: current latest.",
    )
    @click.option("-m", "--message", default=None, help="A note stored in the manifest.")
    @json_opt
    @click.pass_context
    def publish(
        ctx: click.Context,
        name: str,
        directory: str,
        expected: str | None,
        message: str | None,
        as_json: bool,
    ) -> None:
        from chroma_snapshots.stores.base import ANY, LATEST, Expected

        exp: Expected = {None: LATEST, "none": None, "any": ANY}.get(expected, expected)
        info = store_of(ctx, create=True).publish(
            name, directory, expected=exp, message=message, progress=progress_bar("publish")
        )
        s = info.stats
        emit(
            info,
            as_json,
            f"published {name} {info.version}: {info.file_count} files, "
            f"{human_bytes(info.total_size)}; uploaded {human_bytes(s.bytes_uploaded)} "
            f"({s.chunks_transferred} new chunks), reused {human_bytes(s.bytes_reused)}",
        )

    @cli.command(help="Materialize a version of NAME (default ref: latest), every chunk verified.")
    @click.argument("name")
    @click.argument("ref", default="latest")
    @click.option(
        "--dest",
        default=None,
        type=click.Path(file_okay=False),
        help="Empty or new directory. Default: the cache's folder with --cache-dir, "
        "else a new temporary directory.",
    )
    @json_opt
    @click.pass_context
    def checkout(ctx: click.Context, name: str, ref: str, dest: str | None, as_json: bool) -> None:
        snap = store_of(ctx).checkout(name, ref, dest, progress=progress_bar("checkout"))
        s = snap.stats
        emit(
            {"path": snap.path, "info": snap.info, "stats": s},
            as_json,
            f"{snap.path}: {snap.info.version}, downloaded {human_bytes(s.bytes_downloaded)} "
            f"in {s.requests} requests, {s.seconds:.2f}s",
        )

    @cli.command(name="ls", help="List names, or a name's versions and refs.")
    @click.argument("name", required=False)
    @json_opt
    @click.pass_context
    def ls(ctx: click.Context, name: str | None, as_json: bool) -> None:
        store = store_of(ctx)
        if name is None:
            names = list(store.names())
            emit(names, as_json, "\n".join(names))
            return
        refs = store.refs(name)
        versions = list(store.versions(name))
        tags = {v: sorted(r for r, rv in refs.items() if rv == v) for v in refs.values()}
        rows = [
            f"{v.version}  {human_bytes(v.total_size):>10}  {v.file_count:>6} files  "
            f"{','.join(tags.get(v.version, []))}"
            for v in versions
        ]
        emit({"refs": refs, "versions": versions}, as_json, "\n".join(rows))

    @cli.command(help="Show a version's manifest summary.")
    @click.argument("name")
    @click.argument("ref", default="latest")
    @click.option(
        "--chroma",
        "chroma_view",
        is_flag=True,
        help="Also check the version out and show chroma's view: collections, "
        "dimensions, unsynced WAL entries, segment sizes, orphan segment folders.",
    )
    @json_opt
    @click.pass_context
    def info(ctx: click.Context, name: str, ref: str, chroma_view: bool, as_json: bool) -> None:
        if chroma_view:
            _chroma_info(store_of(ctx), name, ref, as_json)
            return
        source = source_of(ctx)  # manifests come from the source; the cache holds files
        found = source.resolve(name, ref)
        m = source.load_manifest(name, found.version)
        stored = sum(c.length for c in m.chunks.values())
        data = {
            "info": found,
            "chunk_size": m.chunk_size,
            "chunks": len(m.chunks),
            "packs": len(m.packs),
            "stored_bytes": stored,
            "files": [f.path for f in m.files],
        }
        emit(
            data,
            as_json,
            "\n".join(
                [
                    f"version   {found.version}",
                    f"parent    {found.parent}",
                    f"created   {found.created_at}",
                    f"files     {found.file_count} ({human_bytes(found.total_size)})",
                    f"chunks    {len(m.chunks)} x {human_bytes(m.chunk_size)} "
                    f"in {len(m.packs)} packs "
                    f"({human_bytes(stored)} stored)",
                    f"message   {found.message or ''}",
                ]
            ),
        )

    @cli.group(help="Inspect and manage the local cache of checked-out versions.")
    def cache() -> None:
        pass

    @cache.command(name="ls", help="List cached versions, least recently used first.")
    @json_opt
    @click.pass_context
    def cache_ls(ctx: click.Context, as_json: bool) -> None:
        from chroma_snapshots.stores.cache.inspect import entries

        found = entries(cache_of(ctx))
        rows = [
            f"{e.name}  {e.version}  {human_bytes(e.size):>10}{'  pinned' if e.pinned else ''}"
            for e in found
        ]
        emit(found, as_json, "\n".join(rows) or "(cache is empty)")

    @cache.command(name="clear", help="Evict every cached version that no process holds open.")
    @json_opt
    @click.pass_context
    def cache_clear(ctx: click.Context, as_json: bool) -> None:
        from chroma_snapshots.stores.cache.inspect import clear

        removed = clear(cache_of(ctx))
        emit(
            removed,
            as_json,
            f"evicted {len(removed)} versions ({human_bytes(sum(e.size for e in removed))})",
        )

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

    @cli.command(
        help="Check the configuration, the stores (reach, list, write, read, delete, "
        "conditional writes, with timings), the EFS hang guard and the /tmp cache. "
        "Never creates a store. Exit 1 if anything fails."
    )
    @click.option("--budget", default=10.0, show_default=True, help="Seconds allowed per store.")
    @json_opt
    @click.pass_context
    def doctor(ctx: click.Context, budget: float, as_json: bool) -> None:
        from chroma_snapshots.cli.doctor import diagnose

        found = diagnose(load=lambda: config_of(ctx), budget=budget)
        rows = [
            f"{f.status.upper():<5} {f.check:<48} {f.seconds * 1000:>8.1f} ms  {f.detail}"
            for f in found
        ]
        emit(found, as_json, "\n".join(rows))
        if any(f.status == "fail" for f in found):
            raise click.exceptions.Exit(1)

    @cli.command(help="Run the demo on an embedded local S3 server (needs the 'demo' extra).")
    @click.option("--size-mb", default=24, show_default=True, help="Approximate database size.")
    @json_opt
    def demo(size_mb: int, as_json: bool) -> None:
        from chroma_snapshots.cli.demo import run_demo

        steps = run_demo(size_mb=size_mb, echo=lambda line: click.echo(line, err=as_json))
        if as_json:
            emit(steps, True, "")

    from chroma_snapshots.cli.admin import register
    from chroma_snapshots.cli.help import add_examples, register_completion

    register(cli)
    register_completion(cli)
    add_examples(cli)
    return cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chroma-snapshots`` script; returns the exit code."""
    if click is None:
        sys.stderr.write("the CLI needs click: pip install 'chroma-snapshots[cli]'\n")
        return 2
    try:
        code = _build().main(args=argv, prog_name="chroma-snapshots", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        return 130
    except SnapshotError as e:
        click.echo(f"error: {e}", err=True)
        return next(code for kind, code in EXIT_CODES if isinstance(e, kind))
    return code if isinstance(code, int) else 0  # click returns an Exit's code


if __name__ == "__main__":
    sys.exit(main())
