"""The rules for a setting's value, one for each kind (seconds, an age, a count, bytes, a
cache folder, a lock's table or key), whether it comes as a variable's text, a CLI flag or
a field built in code; the errors (ConfigError) name where it came from. Nothing here reads
the environment: config does, and the CLI's flags use the same rules."""

from __future__ import annotations

import re

from chroma_snapshots.backends.base import check_key
from chroma_snapshots.engine.deadline import MAX_SECONDS
from chroma_snapshots.engine.keys import PROBES, STORE_KINDS
from chroma_snapshots.engine.validation import cache_dir_path, number_in
from chroma_snapshots.errors import ConfigError, InvalidInputError, shown

SECONDS_RULE = f"must be positive and at most {MAX_SECONDS:.0e}"
BYTES_RULE = "must be a whole number of bytes, 1 to 2**63-1"


def is_seconds(value: object) -> bool:
    """A deadline's seconds: a number in (0, 1e9], not a bool."""
    return number_in(value, 0, MAX_SECONDS, low_ok=False)


def is_bytes(value: object) -> bool:
    """A size in bytes: an int in [1, 2**63), not a bool."""
    return type(value) is int and 0 < value < 2**63


def parse_seconds(raw: str, what: str) -> float:
    """``raw`` as a deadline's seconds: ConfigError naming ``what`` unless a number in
    (0, 1e9] (nan too; a deadline past ~31 years overflows time_t)."""
    value = number(raw)
    if value is None:
        raise ConfigError(f"{what}={shown(raw)} is not a number")
    if not is_seconds(value):
        raise ConfigError(f"{what}={shown(raw)} {SECONDS_RULE}")
    return value


def parse_age(raw: str, what: str, *, other: str = "") -> float:
    """``raw`` as seconds of age, 0 included (prune's grace period, the refresh period):
    ConfigError naming ``what`` (and ``other`` it may be instead) unless a number in
    [0, 1e9], spelled as :func:`parse_seconds` takes them."""
    value = number(raw)
    if value is None or not number_in(value, 0, MAX_SECONDS):
        raise ConfigError(f"{what}={shown(raw)} must be 0 to {MAX_SECONDS:.0e} seconds{other}")
    return value


def parse_count(raw: str, what: str, *, least: int = 0, most: int = 999_999_999) -> int:
    """``raw`` as a count: ConfigError naming ``what`` unless ASCII digits of a number in
    [least, most] (at most nine digits)."""
    value = whole(raw, 9)
    if value is None or not least <= value <= most:
        raise ConfigError(f"{what}={shown(raw)} must be a whole number, {least} to {most}")
    return value


def whole(raw: str, most_digits: int) -> int | None:
    """``raw`` as a whole number in at most ``most_digits`` ASCII digits, or None: int()
    also reads "1_0" and other scripts' digits, and refuses 4,301 digits with ValueError."""
    ok = raw.isascii() and raw.isdigit() and len(raw) <= most_digits
    return int(raw) if ok else None


def number(raw: str) -> float | None:
    """``raw`` as a float, or None: ASCII only (float() also reads other scripts' digits,
    which no one types on purpose into a deadline) and no ``_`` (it reads "1_0" as 10)."""
    try:
        return float(raw) if raw.isascii() and "_" not in raw else None
    except ValueError:
        return None


def check_cache_dir(raw: str, what: str) -> str:
    """``raw`` if it is an absolute path (validation.cache_dir_path, the rule CachedStore's
    argument follows too), else ConfigError naming ``what`` (the variable, the CLI's
    ``--cache-dir``, the field); the shell spells ``$PWD/cache``."""
    try:
        return cache_dir_path(raw, what)
    except InvalidInputError as e:
        raise ConfigError(str(e)) from None


def check_lock_table(table: str, what: str) -> None:
    """ConfigError unless ``table`` (if set) can name a DynamoDB table: a name (3-255 of
    ``[A-Za-z0-9_.-]``) or a table's ARN (another account's table): a bad one failed every
    batch at run time."""
    name = r"[A-Za-z0-9_.\-]{3,255}"
    if table and not re.fullmatch(
        rf"{name}|arn:[a-z\-]+:dynamodb:[a-z0-9\-]+:\d{{12}}:table/{name}", table
    ):
        raise ConfigError(
            f"{what}={shown(table)} is not a DynamoDB table name (3-255 letters, "
            "digits, '_', '-' or '.') or a table's ARN"
        )


def check_lock_key(key: str, name: str, what: str) -> None:
    """ConfigError unless ``key`` (if set) is an object key the store's own objects never
    use (``name`` itself is the snapshot's folder): a bad one failed every message at run
    time, sending the queue to its dead-letter queue, and one among a name's refs or
    manifests made the lock read a ref as a lease."""
    if not key:
        return
    try:
        check_key(key)
    except ValueError as e:
        raise ConfigError(f"{what}={shown(key)}: {e}") from None
    parts = key.split("/")
    if key == name or parts[0] == PROBES or (len(parts) > 1 and parts[1] in STORE_KINDS):
        raise ConfigError(
            f"{what}={shown(key)} is among the store's own objects; use a key such "
            "as locks/compactor"
        )
