"""The ``chroma-snapshots`` command line.

Exit codes: 0 ok, 1 other SnapshotError, 2 bad usage/config/input (including a
URL typo and a write to an endpoint that ignores conditional writes), 3 not found
(including a store that does not exist: only ``publish`` and ``sync``'s
destination create one), 4 conflict (CAS lost), 5 integrity failure, 6 timeout,
7 backend unavailable.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from chroma_snapshots.cli.common import (
    EXIT_CODES,
    cache_dir_option,
    click,
    config_of,
    describe_error,
    emit,
    human_bytes,
    log_warnings_to_stderr,
    progress_bar,
    quiet_stale_warning,
    seconds_option,
    shown,
    source_of,
    store_of,
)
from chroma_snapshots.cli.names import about, no_snapshot, resolve_ref
from chroma_snapshots.cli.views import chroma_info, listing, published_text, version_rows
from chroma_snapshots.engine.cleanup import running, wait_for_new
from chroma_snapshots.engine.deadline import one_deadline
from chroma_snapshots.engine.scratch import keep_scratch
from chroma_snapshots.errors import (
    IntegrityError,
    InvalidInputError,
    SnapshotError,
)


def _a_copy(store: Any, name: str, snap: Any) -> bool:
    """Whether a cached checkout came back as a second holder's copy of the version (the
    cached folder was held), not the cached folder itself."""
    return bool(snap.path != store.dirs(name).tree(snap.info.version))


def _build() -> click.Group:
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

    @click.group(
        help="Versioned, verified ChromaDB snapshots on S3, EFS and /tmp.",
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    @click.version_option(package_name="chroma-snapshots", prog_name="chroma-snapshots")
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
        callback=cache_dir_option,
        help="Serve checkouts through a local cache in DIR, an absolute path "
        "(default: CHROMA_SNAPSHOTS_CACHE_DIR; 'cache' commands: /tmp/chroma-snapshots).",
    )
    @click.option(
        "--endpoint-url",
        default=None,
        metavar="URL",
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3, else AWS).",
    )
    @click.option(
        "--profile",
        default=None,
        metavar="NAME",
        help="AWS profile from ~/.aws (default: AWS_PROFILE).",
    )
    @click.option(
        "--region",
        default=None,
        metavar="REGION",
        help="AWS region (default: AWS_REGION or the profile's).",
    )
    @click.option(
        "--stale-ok",
        is_flag=True,
        help="With a cache: when the store does not answer, serve the version the ref "
        "named when this cache last read it (flagged stale).",
    )
    @click.option(
        "--timeout",
        callback=seconds_option,
        default=None,
        metavar="SECONDS",
        help="Deadline of the command's work with the store "
        "(default: CHROMA_SNAPSHOTS_TIMEOUT, else 600).",
    )
    @click.option(
        "--offline",
        is_flag=True,
        help="Never contact the store: serve only what the cache holds "
        "(also CHROMA_SNAPSHOTS_OFFLINE=1).",
    )
    @click.pass_context
    def cli(
        ctx: click.Context, /, store_url: str | None, cache_dir: str | None, **flags: Any
    ) -> None:
        ctx.obj = {"store_url": store_url, "cache_dir": cache_dir, **flags}

    @cli.command(help="Publish DIRECTORY as a new version of NAME.")
    @click.argument("name")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option(
        "--expected",
        default=None,
        metavar="VERSION",
        help="Version the publish is based on; 'none' if the "
        "name must be new; 'any' to overwrite unconditionally. Default: current latest.",
    )
    @click.option("-m", "--message", default=None, help="A note stored in the manifest.")
    @click.option(
        "--dry-run",
        is_flag=True,
        help="Upload nothing: say which files differ from latest and how many new chunks "
        "and bytes a publish would upload.",
    )
    @click.option(
        "--allow-empty",
        is_flag=True,
        help="Make a new version even if nothing changed since latest (by default, as in "
        "git, an unchanged folder makes none and latest stays).",
    )
    @click.option(
        "--no-stamps",
        is_flag=True,
        help="Read and hash every file instead of trusting the folder's stamp index for "
        "unchanged ones (also CHROMA_SNAPSHOTS_TRUST_STAMPS=0).",
    )
    @json_opt
    @click.pass_context
    def publish(
        ctx: click.Context,
        name: str,
        directory: str,
        expected: str | None,
        message: str | None,
        dry_run: bool,
        allow_empty: bool,
        no_stamps: bool,
        as_json: bool,
    ) -> None:
        from chroma_snapshots.engine.validation import check_name
        from chroma_snapshots.opening import check_publish_folders
        from chroma_snapshots.stores.base import ANY, LATEST, Expected

        check_name(name)  # before a new store's folder is made for it
        ctx.obj["no_stamps"] = no_stamps
        check_publish_folders(directory, config_of(ctx))  # before opening makes any folder

        exp: Expected = {None: LATEST, "none": None, "any": ANY}.get(expected, expected)
        if isinstance(exp, str):  # a version id, or a unique prefix of one
            exp = resolve_ref(source_of(ctx), name, exp)
        if dry_run:
            from chroma_snapshots.cli.plan import describe_plan, plan_publish
            from chroma_snapshots.stores.refs import check_expected_version

            plan = plan_publish(source_of(ctx), name, directory)
            check_expected_version(name, exp, plan.base)  # as the publish would
            emit(plan, as_json, "dry run: nothing uploaded\n" + describe_plan(plan, directory))
            return
        started = datetime.now(timezone.utc)
        info = store_of(ctx, create=True).publish(
            name,
            directory,
            expected=exp,
            message=message,
            progress=progress_bar("publish"),
            allow_empty=allow_empty,
        )
        # An unchanged folder gets latest's info back: a version made before this publish.
        emit(info, as_json, published_text(info, unchanged=info.created_at < started))

    @cli.command(help="Materialize a version of NAME (default ref: latest), every chunk verified.")
    @click.argument("name")
    @click.argument("ref", default="latest")
    @click.option(
        "--dest",
        default=None,
        type=click.Path(file_okay=False),
        help="Empty or new directory. Default: the cache's folder with --cache-dir, "
        "else a new temporary directory, kept (its path is printed).",
    )
    @json_opt
    @click.pass_context
    def checkout(ctx: click.Context, name: str, ref: str, dest: str | None, as_json: bool) -> None:
        store = store_of(ctx)
        offline = config_of(ctx).offline
        with about(store, name), quiet_stale_warning(offline):
            ref = resolve_ref(store, name, ref)
            snap = store.checkout(name, ref, dest, progress=progress_bar("checkout"))
        s = snap.stats
        cached = getattr(store, "root", None) is not None
        if cached:  # the pin ends with this process anyway; in-process callers must not leak it
            snap.release()
        if cached and dest is None and _a_copy(store, name, snap):  # gone with this command
            raise InvalidInputError(
                f"{name} {snap.info.version} is held by another checkout, which may be writing "
                "to the cached folder: use --dest DIR for a copy of your own"
            )
        if dest is None and not cached:
            keep_scratch(snap.path.parent)  # the next checkout's sweep must not take it
            click.echo(
                f"kept: the checkout stays in {snap.path}; remove {snap.path.parent} when "
                "done (--dest DIR chooses where; --cache-dir reuses one cached copy)",
                err=True,
            )
        if snap.stale and offline:  # (online, the cache itself warns that the store failed)
            click.echo(f"offline: served what {ref!r} named when the cache last read it", err=True)
        emit(
            {"path": snap.path, "info": snap.info, "stats": s, "stale": snap.stale},
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
        try:
            refs, bad_refs = store.refs(name), None
        except IntegrityError as e:  # a damaged ref must not hide the versions either
            refs, bad_refs = {}, str(e)
        versions, damaged = listing(store, name, refs)
        if not refs and not versions and not damaged:
            raise no_snapshot(name)
        data: dict[str, Any] = {"refs": refs, "versions": versions}
        if damaged:
            data["damaged"] = damaged
        if bad_refs:
            data["damaged_refs"] = bad_refs
        rows = version_rows(refs, versions, damaged)
        emit(data, as_json, rows + (f"\nDAMAGED REFS: {bad_refs}" if bad_refs else ""))

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
            store = store_of(ctx)
            with about(store, name):
                chroma_info(store, name, resolve_ref(store, name, ref), as_json)
            return
        # Manifests come from the source, except offline or with --stale-ok: then the cache
        # answers for the versions it holds, as a checkout would.
        cfg = config_of(ctx)
        source = store_of(ctx) if cfg.offline or cfg.stale_ok else source_of(ctx)
        with about(source, name):
            found = source.resolve(name, resolve_ref(source, name, ref))
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
                    f"message   {shown(found.message)}",
                ]
            ),
        )

    from chroma_snapshots.cli.admin import register as register_admin
    from chroma_snapshots.cli.cache import register as register_cache
    from chroma_snapshots.cli.help import add_examples, register_completion
    from chroma_snapshots.cli.plan import register as register_status
    from chroma_snapshots.cli.support import register as register_support

    for register in (register_admin, register_cache, register_status, register_support):
        register(cli)
    register_completion(cli)
    add_examples(cli)
    return cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``chroma-snapshots`` script; returns the exit code."""
    if click is None:
        sys.stderr.write("the CLI needs click: pip install 'chroma-snapshots[cli]'\n")
        return 2
    log_warnings_to_stderr()
    before = running()
    with _one_interrupt():
        with one_deadline():  # --timeout bounds the whole command
            code = _run(argv)
        # what a failed call of this command left running (the removal of its pin or prune
        # record, of a work folder): a process exiting at once ended it unsent, and a
        # timed-out prune's record then refused ref moves for 15 minutes
        wait_for_new(before, EXIT_WAIT)
    return code


EXIT_WAIT = 1.0  # seconds a command waits at exit for the clean-ups its calls left running


@contextmanager
def _one_interrupt() -> Iterator[None]:
    """While the command runs and its clean-ups finish, the first Ctrl-C interrupts it and
    later ones are ignored: a second one cut the clean-up of the first short (a work folder
    left) or killed the process by the signal instead of exit code 130. Python's own
    handler is back when :func:`main` returns: a program that called it in-process, and
    every process it starts after, gets Ctrl-C again (they inherit an ignored SIGINT).
    Only where Python's own handler is installed, in the main thread (a host program's
    handler is left alone)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def first_only(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first_only)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(argv: list[str] | None) -> int:
    assert click is not None
    try:
        code = _build().main(args=argv, prog_name="chroma-snapshots", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("interrupted", err=True)
        return 130
    except SnapshotError as e:
        click.echo(f"error: {describe_error(e)}", err=True)
        return next(code for kind, code in EXIT_CODES if isinstance(e, kind))
    except OSError as e:  # a local file the library did not wrap: one line, not a traceback
        click.echo(f"error: {describe_error(e)}", err=True)
        return 1
    except Exception as e:  # not wrapped anywhere: a bug, but still one line (the traceback
        # goes to the library's logger at debug level, for a report)
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        click.echo(
            f"error: unexpected {type(e).__name__}: {e} (a bug in chroma-snapshots: please "
            "report it with the command)",
            err=True,
        )
        return 1
    return code if isinstance(code, int) else 0  # click returns an Exit's code


if __name__ == "__main__":
    sys.exit(main())
