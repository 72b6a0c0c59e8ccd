"""``chroma-snapshots doctor``: check a deployment the way an engineer would by hand.

Every probe is bounded (S3 calls by the deadline, mount calls by the hang guard),
so the doctor itself answers in seconds even when a mount is hung.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from chroma_snapshots.backends.bounded import DeadlineBackend
from chroma_snapshots.backends.cas import OPT_OUT, PROBE_DIR, probe_conditional_writes, unchecked
from chroma_snapshots.config import StoreConfig
from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.errors import SnapshotError
from chroma_snapshots.opening import remote_for

Status = str  # "ok", "warn", "fail" or "skip" (not tried: a check it needs failed)


@dataclass(frozen=True)
class Finding:
    """One check: what was checked, how it went, how long it took, and the detail."""

    check: str
    status: Status
    seconds: float
    detail: str


def _timed(check: str, fn: Callable[[], str]) -> Finding:
    t = time.monotonic()
    try:
        detail = fn()
        status = "ok"
    except (SnapshotError, OSError) as e:
        detail, status = f"{type(e).__name__}: {e}", "fail"
    return Finding(check, status, time.monotonic() - t, detail)


def probe_store(cfg: StoreConfig, url: str, *, budget: float = 10.0) -> list[Finding]:
    """Reach the store, list it, and write, read back and delete a probe object. Each check
    has ``budget`` seconds of its own; a check that needs an earlier one that failed (a
    read needs the write) is skipped, so every failure reported is what really happened."""
    try:
        store = remote_for(cfg, url, create=False)  # diagnosing never creates a store
    except SnapshotError as e:
        return [Finding(f"{url}: open", "fail", 0.0, f"{type(e).__name__}: {e}")]
    backend = unchecked(store.backend)
    key = f"{PROBE_DIR}/doctor-{uuid.uuid4().hex}"
    payload = b"chroma-snapshots doctor probe"
    names: list[str] = []

    def io() -> DeadlineBackend:
        return DeadlineBackend(backend, Deadline(budget))

    def write() -> str:
        io().put(key, payload)
        return f"wrote {key}"

    def read() -> str:
        if io().get(key).data != payload:
            raise OSError("the probe object read back different bytes")
        return "read back what was written"

    def delete() -> str:
        io().delete(key)
        return "removed the probe"

    def listing() -> str:
        names.extend(n for n in io().list_dirs("") if n != PROBE_DIR)
        # the label says which server (s3://b/p at http://host:9000); the checks' names stay
        # the URL, as scripts key them
        shown = f": {', '.join(names[:5])}" if names else ""
        return f"{store.label}: {len(names)} snapshot names{shown}"

    listed = _timed(f"{url}: list", listing)
    found = [listed]
    if listed.status == "fail":
        found += [_skipped(f"{url}: {c}", "the list failed") for c in _AFTER_LIST]
    else:
        wrote = _timed(f"{url}: write", write)
        found.append(wrote)
        if wrote.status == "fail":
            found += [_skipped(f"{url}: {c}", "the write failed") for c in _AFTER_LIST[1:]]
        else:
            found += [_timed(f"{url}: read", read), _timed(f"{url}: delete", delete)]
            found.append(conditional_writes(cfg, url, io()))
    found += _guard_findings(store.backend, url)
    store.close()
    return found


_AFTER_LIST = ("write", "read", "delete", "conditional writes")


def _skipped(check: str, because: str) -> Finding:
    return Finding(check, "skip", 0.0, f"not tried: {because}")


def _guard_findings(backend: object, url: str) -> list[Finding]:
    guard = getattr(backend, "guard", None)
    if guard is None:
        return []
    s = guard.stats()
    status = "ok" if s.healthy and not s.abandoned else "fail"
    detail = f"healthy={s.healthy} timeouts={s.timeouts} abandoned={s.abandoned}"
    return [Finding(f"{url}: hang guard", status, 0.0, detail)]


def conditional_writes(cfg: StoreConfig, url: str, io: DeadlineBackend) -> Finding:
    """Does the store refuse a second create and a stale update? An endpoint that ignores
    them fails (publish refuses it), or warns when the configuration opted out."""
    check = f"{url}: conditional writes"
    t = time.monotonic()
    try:
        problem = probe_conditional_writes(io)
    except (SnapshotError, OSError) as e:
        return Finding(check, "fail", time.monotonic() - t, f"{type(e).__name__}: {e}")
    took = time.monotonic() - t
    if problem is None:
        return Finding(check, "ok", took, "honoured: a second create and a stale update refused")
    if cfg.unsafe_no_cas:
        return Finding(check, "warn", took, f"the endpoint {problem}; allowed by {OPT_OUT}")
    detail = f"the endpoint {problem}: publish and set_ref refuse it (opt out: {OPT_OUT})"
    return Finding(check, "fail", took, detail)


def probe_cache(cfg: StoreConfig) -> list[Finding]:
    """Free space where the cache lives, and what it holds."""
    from chroma_snapshots.stores.cache import DEFAULT_CACHE_DIR, CachedStore
    from chroma_snapshots.stores.cache.inspect import entries

    cache_dir = cfg.cache_dir or DEFAULT_CACHE_DIR
    t = time.monotonic()
    try:
        free = shutil.disk_usage(_existing_parent(cache_dir)).free
    except OSError as e:
        return [Finding("cache: free space", "fail", 0.0, str(e))]
    status = "ok" if free > 512 << 20 else "warn"
    out = [
        Finding(
            "cache: free space",
            status,
            time.monotonic() - t,
            f"{free / 2**30:.2f} GiB free at {cache_dir}",
        )
    ]
    if cfg.cache_dir is None:
        out.append(
            Finding(
                "cache: configured",
                "warn",
                0.0,
                "CHROMA_SNAPSHOTS_CACHE_DIR is not set: every checkout downloads",
            )
        )
        return out
    try:
        found = entries(CachedStore(remote_for(cfg, cfg.url, create=False), cache_dir))
    except SnapshotError as e:
        return [*out, Finding("cache: contents", "fail", 0.0, str(e))]
    size = sum(e.size for e in found)
    out.append(
        Finding(
            "cache: contents",
            "ok",
            0.0,
            f"{len(found)} versions, {size / 2**20:.1f} MiB, {sum(e.pinned for e in found)} pinned",
        )
    )
    return out


def _existing_parent(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    return path


def diagnose(
    cfg: StoreConfig | None = None,
    *,
    budget: float = 10.0,
    load: Callable[[], StoreConfig] = StoreConfig.from_env,
) -> list[Finding]:
    """All findings for ``cfg`` (default: what ``load`` reads, the environment's configuration);
    a configuration that does not load is the one, failed, finding."""
    if cfg is None:
        try:
            cfg = load()
        except SnapshotError as e:
            return [Finding("configuration", "fail", 0.0, str(e))]
    urls = [cfg.url] + ([cfg.fallback_url] if cfg.fallback_url else [])
    summary = " then ".join(urls) + (" (mirrored)" if cfg.mirror else "")
    if cfg.s3_endpoint_url and any(url.startswith(("s3://", "fsspec+s3://")) for url in urls):
        summary += f"; S3 endpoint {cfg.s3_endpoint_url}"  # which server, before any probe
    keys = len(cfg.signing_keys.split(",")) if cfg.signing_keys else 0  # ids only, no secret
    summary += f"; signing on ({keys} key{'s' * (keys > 1)})" if keys else "; signing off"
    findings = [Finding("configuration", "ok", 0.0, f"store {summary}")]
    for url in urls:
        findings += probe_store(cfg, url, budget=budget)
    return findings + probe_cache(cfg)
