"""What every command shares: exit codes, output, and the store the options name."""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from chroma_snapshots.errors import (
    BackendUnavailableError,
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    SnapshotError,
    SnapshotNotFoundError,
    StorageTimeoutError,
)

if TYPE_CHECKING:
    from chroma_snapshots.config import StoreConfig
    from chroma_snapshots.stores.base import SnapshotStore, SourceStore
    from chroma_snapshots.stores.cache import CachedStore

try:
    import click as click  # re-exported: main.py builds the group with it
except ImportError:  # the core package stays small; the CLI is an extra
    click = None  # type: ignore[assignment]

EXIT_CODES: list[tuple[type[SnapshotError], int]] = [
    (ConfigError, 2),
    (InvalidInputError, 2),
    (SnapshotNotFoundError, 3),
    (ConflictError, 4),
    (IntegrityError, 5),
    (StorageTimeoutError, 6),
    (BackendUnavailableError, 7),
    (SnapshotError, 1),
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj


def emit(data: Any, as_json: bool, text: str) -> None:
    """Print ``data`` as JSON, or ``text`` for people."""
    click.echo(json.dumps(_jsonable(data), indent=2, sort_keys=True) if as_json else text)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def config_of(ctx: click.Context, url: str | None = None) -> StoreConfig:
    """The library's configuration reader with ``--store`` (or ``url``) replacing only the store
    URL, and each flag given (``--cache-dir``, ``--endpoint-url``, ``--profile``, ``--region``,
    ``--stale-ok``, ``--offline``, ``--timeout``, publish's ``--no-stamps``) only its own
    setting: signing keys, S3 and EFS timeouts, cache size and the CAS opt-out still come from
    the environment."""
    from chroma_snapshots.config import StoreConfig

    cfg = StoreConfig.from_env(url=url or ctx.obj["store_url"])
    flags = ctx.obj
    changes: dict[str, Any] = {
        "cache_dir": flags.get("cache_dir"),
        "s3_endpoint_url": flags.get("endpoint_url"),
        "s3_profile": flags.get("profile"),
        "s3_region": flags.get("region"),
        "stale_ok": flags.get("stale_ok"),
        "offline": flags.get("offline"),
        "timeout": flags.get("timeout"),
    }
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v})
    # publish --no-stamps: the one flag that turns a setting off
    return replace(cfg, trust_stamps=False) if flags.get("no_stamps") else cfg


def seconds_option(ctx: click.Context, param: click.Parameter, raw: object) -> float | None:
    """A ``--timeout``-like option: the environment's rules (values.parse_seconds), and
    its ConfigError the same one line (exit 2) as the variable's, not click's usage text."""
    from chroma_snapshots.values import parse_seconds

    return None if raw is None else parse_seconds(str(raw), f"--{param.name}")


def age_option(ctx: click.Context, param: click.Parameter, raw: object) -> float:
    """``--min-age``-like: seconds, 0 included, by the variables' spelling rules."""
    from chroma_snapshots.values import parse_age

    return parse_age(str(raw), f"--{param.name}".replace("_", "-"))


def count_option(ctx: click.Context, param: click.Parameter, raw: object) -> int:
    """``--keep-last``-like: a whole number in ASCII digits, at least 1 (prune keeps the
    newest version whatever it is told: 0 was refused by a second message)."""
    from chroma_snapshots.values import parse_count

    return parse_count(str(raw), f"--{param.name}".replace("_", "-"), least=1)


DEMO_MOST_MB = 4096  # the demo builds its database on the local disk, then copies it twice


def demo_size(ctx: click.Context, param: click.Parameter, raw: object) -> int:
    """``demo --size-mb``: a count as ``--keep-last``'s, 1 to ``DEMO_MOST_MB`` (a digit
    too many would fill the disk before anything is shown)."""
    from chroma_snapshots.values import parse_count

    return parse_count(str(raw), "--size-mb", least=1, most=DEMO_MOST_MB)


def cache_dir_option(ctx: click.Context, param: click.Parameter, raw: object) -> str | None:
    """``--cache-dir``: the environment's rule (values.check_cache_dir: an absolute path),
    and its ConfigError the same one line (exit 2) as the variable's."""
    from chroma_snapshots.values import check_cache_dir

    return None if raw is None else check_cache_dir(str(raw), "--cache-dir")


def shown(text: str | None) -> str:
    """``text`` (a publisher's message: anyone's words) on one line with no control
    characters: a newline would break ``ls`` into lines, an escape sequence would drive
    the terminal. They are shown escaped (``\\n``, ``\\x07``); ``--json`` keeps the text."""
    if not text:
        return ""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_error(err: BaseException) -> str:
    """One line for an error: a local disk error as ``path: what failed: cause``."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def store_of(ctx: click.Context, *, create: bool = False) -> SnapshotStore:
    """The configured store, through the cache when one is configured. Only commands that
    write a new store (``create``) may create a missing local store directory."""
    from chroma_snapshots.opening import open_store

    cfg = config_of(ctx)
    if cfg.offline:  # for the whole command: the store is never asked, so nothing is "stale"
        ctx.with_resource(quiet_stale_warning(True))
    with _loading():
        return _in_time(cfg, lambda: open_store(cfg, create=create))


def source_of(ctx: click.Context) -> SourceStore:
    """The configured store without the cache layer (manifests, diffs)."""
    from chroma_snapshots.opening import source_for

    cfg = config_of(ctx)
    with _loading():
        return _in_time(cfg, lambda: source_for(cfg, create=False))


def cache_of(ctx: click.Context) -> CachedStore:
    """The cache the ``cache`` commands inspect (default directory: /tmp/chroma-snapshots)."""
    from chroma_snapshots.opening import source_for
    from chroma_snapshots.stores.cache import DEFAULT_CACHE_DIR, CachedStore

    cfg = config_of(ctx)
    cache_dir = cfg.cache_dir or DEFAULT_CACHE_DIR
    with _loading():
        source = _in_time(cfg, lambda: source_for(cfg, create=False))
    return CachedStore(source, cache_dir, max_bytes=cfg.cache_max_bytes)


def _in_time(cfg: StoreConfig, open_it: Callable[[], T]) -> T:
    """Open within the command's deadline (``--timeout``: the one its store calls share),
    started now: opening a store on a mount that does not answer is part of the command."""
    from chroma_snapshots.engine.deadline import as_deadline, within

    return within(as_deadline(None, cfg.timeout), open_it)


_frozen = [False]  # whether a command of this process froze what it loaded (see _loading)


@contextmanager
def _loading() -> Iterator[None]:
    """Opening a store imports botocore and loads its S3 model: tens of thousands of objects
    that live as long as the process. Collecting garbage while they pile up walks them again
    and again, and so does every later collection and the one at exit: together ~90 ms of
    CPU of a small checkout's ~0.35 s (benchmarks/RESULTS.md, "Fixed cost of one checkout
    process"). So no collection runs meanwhile, and the first time in a process what was
    loaded is frozen (gc.freeze: later collections skip it). Only once: a process that runs
    many commands (tests) would otherwise keep each command's garbage forever. Only the CLI
    does this; the library leaves the application's collector alone."""
    from chroma_snapshots.engine.manifest_v2 import collector_paused

    with collector_paused():
        try:
            yield
        finally:
            if not _frozen[0]:
                _frozen[0] = True
                gc.freeze()


def progress_bar(label: str) -> Callable[[int, int], None] | None:
    """A tqdm bar on stderr for a transfer, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    import shutil

    from tqdm import tqdm

    # a pty that reports a 0x0 size would hide the bar; get_terminal_size falls back to 80x24
    size = shutil.get_terminal_size()
    bar = tqdm(
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        ncols=size.columns,
        nrows=size.lines,
    )

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


def log_warnings_to_stderr() -> None:
    """The library's warnings (a fallback to the next store, a stale read) as ``warning: ...``
    lines on stderr, unless the application configured logging itself."""
    root = logging.getLogger("chroma_snapshots")
    if not root.handlers and not logging.getLogger().handlers:
        root.addHandler(_Stderr())


class _Stderr(logging.Handler):
    """Writes to whatever stderr is when a record comes (not the one at start-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


@contextmanager
def quiet_stale_warning(quiet: bool) -> Iterator[None]:
    """Offline, every cached read is "stale" by design: the cache's warning that the store did
    not answer would read as a failure (the command says what it served instead)."""
    cache_log = logging.getLogger("chroma_snapshots.stores.cache.refmemory")  # (its warning)
    level = cache_log.level
    if quiet:
        cache_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cache_log.setLevel(level)
