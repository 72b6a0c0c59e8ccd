"""Parsing and validation primitives for untrusted JSON (manifests, refs) and names.

Everything here raises IntegrityError (stored data) or InvalidInputError (caller
arguments) with a message that says what was wrong, never a KeyError or TypeError.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Hashable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeGuard, TypeVar

from chroma_snapshots.errors import IntegrityError, InvalidInputError, shown

FORMAT_VERSION = 1
CODECS = ("none", "zstd")
MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger is a corrupt or hostile manifest
MAX_PACK_SIZE = 1 << 32
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_PATH_DEPTH = 64  # components; deeper trees are refused, never walked or created
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 12, 1 << 26
# Counts and byte sizes a manifest may declare: 1 Mi chunks is 64 GiB at the default chunk
# size, and a chunk costs under 300 bytes of canonical JSON (its table entry and its hash in
# a file's list), so 256 MiB leaves room for paths and metadata.
MAX_CHUNKS = MAX_FILES = MAX_DIRS = 1 << 20
MAX_MANIFEST_BYTES = 1 << 28
MAX_REF_BYTES = 4096  # a ref is about 200 bytes, signed or not
MAX_METADATA_DEPTH = 32  # nesting of a manifest's free-form metadata
MAX_CHUNK_REFS = 1 << 23  # chunk positions in all files: 512 GiB at 64 KiB chunks


def check_source(paths: list[str], dirs: list[str], sizes: Iterable[int], chunk_size: int) -> None:
    """InvalidInputError for a source readers would refuse, before a byte of it is read:
    the readers' own path rule (:func:`check_tree`) and the bound on chunk positions."""
    try:
        check_tree(paths, dirs)
    except IntegrityError as e:
        raise InvalidInputError(
            f"the source cannot be published: {e} (paths that differ only in case, or a "
            "file where another path needs a folder, clash on a case-insensitive disk, and "
            "every reader refuses them): rename one"
        ) from None
    check_chunk_refs(sizes, chunk_size)


def check_chunk_refs(sizes: Iterable[int], chunk_size: int) -> None:
    """InvalidInputError if files of ``sizes`` need more chunk positions than a manifest
    may hold: said before a byte is read, not after hashing them all (a sparse file of
    600 GiB reads as zeros until the deadline)."""
    n = sum(-(-size // chunk_size) for size in sizes)
    if n > MAX_CHUNK_REFS:
        raise InvalidInputError(
            f"the source needs {n:,} chunks of {chunk_size:,} bytes; a manifest holds at most "
            f"{MAX_CHUNK_REFS:,}: publish fewer or smaller files, or use a larger chunk size"
        )


MAX_CHAIN = 8  # deltas between a chunk and its keyframe: bounds what a cold reader fetches

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A path check_relpath accepts, for ASCII paths (always NFC; a byte a character): 1 to
# MAX_PATH_DEPTH components of 1 to MAX_COMPONENT_BYTES characters, none "." or "..", no
# NUL or backslash. One C call instead of a split and a check per component; whatever it
# does not match goes through the full checks, which say what is wrong.
_COMPONENT = rf"(?!\.\.?(?:/|\Z))[\x01-\x2e\x30-\x5b\x5d-\x7f]{{1,{MAX_COMPONENT_BYTES}}}"
_ASCII_RELPATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT}){{0,{MAX_PATH_DEPTH - 1}}}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RE = re.compile(r"(\d{8}T\d{12}Z)-([0-9a-f]{12})")
_TIME_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` the one way this library writes JSON (sorted, compact, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def utc_now() -> datetime:
    """The current time in UTC (one place, so tests can reason about it)."""
    return datetime.now(timezone.utc)


def format_time(t: datetime) -> str:
    """``2026-11-29T05:00:00.123456Z`` (the year always four digits: C's strftime writes
    year 26 as ``26``, which no parser takes back)."""
    utc = t.astimezone(timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def parse_time(s: object, what: str) -> datetime:
    """Parse :func:`format_time` output, raising IntegrityError on anything else."""
    if not isinstance(s, str):
        raise IntegrityError(f"{what}: expected a timestamp string")
    try:
        t = datetime.strptime(s, _TIME_FMT).replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise IntegrityError(f"{what}: bad timestamp {s!r}") from e
    if format_time(t) != s:  # "2026-1-2T...", "0026" written as "26": not one we write
        raise IntegrityError(f"{what}: bad timestamp {s!r}")
    return t


def check_chunk_size(size: object) -> int:
    """A chunk size a writer may use: a power of two in [4 KiB, 64 MiB] (what readers accept)."""
    if type(size) is not int or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or size & (size - 1):
        raise InvalidInputError(
            f"chunk_size {size!r} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )
    return size


def path_text(x: object) -> str | None:
    """``x`` as a str path if it is a str or a path object naming one; None for anything
    else (bytes, a number, a path object whose ``__fspath__`` gives no str)."""
    try:
        path = os.fspath(x) if isinstance(x, str | os.PathLike) else None
    except TypeError:  # a PathLike whose __fspath__ returns something else
        return None
    return path if isinstance(path, str) else None


def cache_dir_path(raw: object, what: str) -> str:
    """``raw`` (a str or a path) as a str if it names an absolute path, else
    InvalidInputError naming ``what``: a relative one would depend on the working directory
    of whatever process reads it (a Lambda's is read-only), and one cache per directory a
    command ran in defeats the cache; an empty one, one with a NUL, bytes or a number are
    no path. The one rule of every way to name a cache's folder (values.check_cache_dir)."""
    path = path_text(raw)
    if not (path is not None and os.path.isabs(path) and "\0" not in path):
        raise InvalidInputError(
            f"{what}={shown(raw)} must be an absolute path, e.g. /tmp/chroma-snapshots"
        )
    if path != path.strip():  # the environment's value is stripped: a flag's named another
        raise InvalidInputError(f"{what}={shown(raw)} ends with white space")
    return path


def number_in(x: object, low: float, high: float, *, low_ok: bool = True) -> bool:
    """``x`` is a number in ``[low, high]`` (``(low, high]`` without ``low_ok``) and not a
    bool (True would be 1 second or byte); NaN is in no range."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    return (low <= x if low_ok else low < x) and x <= high


def check_flags(flags: Mapping[str, object]) -> None:
    """InvalidInputError naming the first of ``flags`` (argument name -> value) that is not
    a bool: taken by truthiness, ``"no"`` and ``"False"`` are on and ``None`` is off."""
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidInputError(f"{flag} must be True or False, not {shown(value)}")


def is_name(name: object) -> bool:
    """True if ``name`` is a valid snapshot or ref name (see :func:`check_name`)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str, what: str = "snapshot name") -> str:
    """Validate a snapshot or ref name: 1-128 of ``[A-Za-z0-9._-]``, starting alphanumeric."""
    if not is_name(name):
        raise InvalidInputError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_relpath(path: object, what: str = "path") -> str:
    """Validate a relative POSIX path from a manifest or a source tree: at most
    ``MAX_PATH_DEPTH`` components of at most ``MAX_COMPONENT_BYTES``, ``MAX_PATH_BYTES`` in all."""
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"{what}: empty or not a string")
    if path.isascii() and len(path) <= MAX_PATH_BYTES and _ASCII_RELPATH.fullmatch(path):
        return path
    return check_relpath_parts(path, what)


def check_relpaths(paths: list[str], what: str = "path") -> None:
    """:func:`check_relpath` for each of ``paths`` (one regex each for ASCII paths: checks
    of all of them joined measured no faster)."""
    for p in paths:
        check_relpath(p, what)


def check_relpath_parts(path: str, what: str = "path") -> str:
    """:func:`check_relpath` component by component, for any string (its fast path is for
    ASCII ones): the rules as written, and what says which one a path breaks."""
    parts = path.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise IntegrityError(f"{what}: {len(parts)} components, more than {MAX_PATH_DEPTH}")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:  # a lone surrogate: a file name that is not UTF-8
        raise IntegrityError(f"{what}: not UTF-8 text {path!r}") from None
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or size > MAX_PATH_BYTES
        or unicodedata.normalize("NFC", path) != path
    )
    if bad or any(p in ("", ".", "..") or len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        raise IntegrityError(f"{what}: unsafe or non-canonical path {path!r}")
    return path


def loads_json(data: bytes, what: str, max_bytes: int) -> object:
    """Parse stored JSON of at most ``max_bytes``; IntegrityError for anything else.

    The size is checked before parsing so a hostile object costs no more memory than the
    largest valid one. CPython's C decoder counts nesting against the recursion limit, so
    a deeply nested document ends in RecursionError, caught here, never a crash."""
    if len(data) > max_bytes:
        raise IntegrityError(f"{what} is {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        return json.loads(data)
    except RecursionError as e:
        raise IntegrityError(f"{what} is nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # also an integer with too many digits
        raise IntegrityError(f"{what} is not valid JSON") from e


def check_depth(o: object, what: str, limit: int) -> None:
    """IntegrityError if lists and objects in ``o`` nest deeper than ``limit``. Iterative: it
    must not itself run out of stack on what it is checking."""
    todo: list[tuple[object, int]] = [(o, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            if depth >= limit:
                raise IntegrityError(f"{what} nests deeper than {limit} levels")
            todo.extend((c, depth + 1) for c in (node.values() if isinstance(node, dict) else node))


def as_obj(o: object, what: str, keys: set[str] | None) -> dict[str, Any]:
    if not isinstance(o, dict) or not all(isinstance(k, str) for k in o):
        raise IntegrityError(f"{what}: expected a JSON object")
    if keys is not None and set(o) != keys:
        raise IntegrityError(f"{what}: fields {sorted(o)} differ from {sorted(keys)}")
    return o


def as_list(o: object, what: str) -> list[Any]:
    if not isinstance(o, list):
        raise IntegrityError(f"{what}: expected a list")
    return o


def as_int(o: object, what: str, lo: int, hi: int) -> int:
    if type(o) is not int or not lo <= o <= hi:
        raise IntegrityError(f"{what}: expected an integer in [{lo}, {hi}], got {o!r}")
    return o


def as_str(o: object, what: str) -> str:
    if not isinstance(o, str):
        raise IntegrityError(f"{what}: expected a string")
    return o


def as_opt_str(o: object, what: str) -> str | None:
    return None if o is None else as_str(o, what)


def is_hex64(o: object) -> TypeGuard[str]:
    """True for 64 lowercase hex digits: a sha256, the name of every chunk and pack."""
    return isinstance(o, str) and _HEX64.fullmatch(o) is not None


def as_hex64(o: object, what: str) -> str:
    if not is_hex64(o):
        raise IntegrityError(f"{what}: expected 64 lowercase hex digits")
    return o


K = TypeVar("K", bound=Hashable)


def check_chains(bases: Mapping[K, K | None], used: Iterable[K]) -> set[K]:
    """Every entry of a chunk table (hash -> its delta base or None) that the ``used``
    chunks need: themselves and the links of their delta chains. IntegrityError for a base
    missing from the table, a cycle, or a chain of more than ``MAX_CHAIN`` deltas."""
    depth: dict[K, int] = {}
    for h in used:
        if bases.get(h, h) is None:  # a keyframe, most entries: no chain to walk
            depth[h] = 0
            continue
        path: list[K] = []
        x = h
        while x not in depth:
            if x not in bases:
                raise IntegrityError(
                    f"chunk {str(h)[:12]}: delta base {str(x)[:12]} is not in the table"
                )
            base = bases[x]
            if base is None:
                depth[x] = 0
                break
            if x in path:
                raise IntegrityError(f"chunk {str(h)[:12]}: its delta chain is a cycle")
            if len(path) >= MAX_CHAIN:
                raise IntegrityError(f"chunk {str(h)[:12]}: delta chain longer than {MAX_CHAIN}")
            path.append(x)
            x = base
        d = depth[x]
        for y in reversed(path):
            d += 1
            if d > MAX_CHAIN:
                raise IntegrityError(f"chunk {str(h)[:12]}: delta chain longer than {MAX_CHAIN}")
            depth[y] = d
    return set(depth)


def check_tree(files: list[str], dirs: list[str]) -> None:
    """IntegrityError for a path listed twice (case-folded) or a path inside a file."""
    keys = [p.casefold() for p in files + dirs]  # names that clash on a case-insensitive disk
    file_keys = set(keys[: len(files)])
    # Every directory some path is in: a parent already seen has its own parents in too.
    parents: set[str] = set()
    for k in keys:
        i = k.rfind("/")
        while i > 0 and k[:i] not in parents:
            parents.add(k[:i])
            i = k.rfind("/", 0, i)
    if len(set(keys)) != len(keys) or not parents.isdisjoint(file_keys):
        _refuse_tree(files + dirs, file_keys)


def _refuse_tree(paths: list[str], file_keys: set[str]) -> None:
    """The first clash or path inside a file in ``paths``, as an IntegrityError."""
    seen: set[str] = set()
    for p in paths:
        key = p.casefold()
        if key in seen:
            raise IntegrityError(f"duplicate path {p!r}")
        seen.add(key)
    for p in paths:
        parts = p.casefold().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in file_keys:
                raise IntegrityError(f"path {p!r} is inside a file")
    raise IntegrityError("a path clashes with another")  # not reached: the checks agree
