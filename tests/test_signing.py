"""Signed manifests and refs: tampering, wrong keys, unsigned data and key rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chroma_snapshots import ConfigError, IntegrityError, RemoteStore, StoreConfig
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.engine.keys import manifest_key, ref_key
from chroma_snapshots.engine.signing import Signer
from chroma_snapshots.engine.validation import canonical_json
from chroma_snapshots.testing.conformance import read_tree, write_tree

KEY_A = "a:" + "secret-number-one-" * 2
KEY_B = "b:" + "secret-number-two-" * 2


def _store(root: Path, spec: str | None) -> RemoteStore:
    return RemoteStore(
        FileBackend(root), chunk_size=4096, signer=Signer.from_spec(spec) if spec else None
    )


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "src", {"chroma.sqlite3": b"x" * 10000, "seg/index_metadata.pickle": b"p"}
    )


def test_signed_round_trip_and_wrong_key(tmp_path: Path, src: Path) -> None:
    signed = _store(tmp_path / "store", KEY_A)
    version = signed.publish("db", src).version
    assert read_tree(signed.checkout("db", dest=tmp_path / "o1").path) == read_tree(src)
    with pytest.raises(IntegrityError, match="not accepted"):
        _store(tmp_path / "store", KEY_B).resolve("db")
    with pytest.raises(IntegrityError, match="not accepted"):
        _store(tmp_path / "store", KEY_B).resolve("db", version)  # the manifest, by version id
    assert _store(tmp_path / "store", None).resolve("db").version == version  # unsigned reader


def test_unsigned_data_is_refused(tmp_path: Path, src: Path) -> None:
    version = _store(tmp_path / "store", None).publish("db", src).version
    signed = _store(tmp_path / "store", KEY_A)
    with pytest.raises(IntegrityError, match="not signed"):
        signed.resolve("db")
    for ref in ("latest", version):  # by ref name and by version id: nothing is written
        with pytest.raises(IntegrityError, match="not signed"):
            signed.checkout("db", ref, dest=tmp_path / "o")
        assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "store"]  # no temp folder either


def test_a_store_without_the_key_never_writes_an_unsigned_ref_over_a_signed_one(
    tmp_path: Path, src: Path
) -> None:
    # An empty or forgotten key variable: a publish, tag, rollback or sync made without it
    # would leave an unsigned ref that every reader holding the key refuses.
    from chroma_snapshots import ANY
    from chroma_snapshots.ops.sync import sync_version

    signed = _store(tmp_path / "store", KEY_A)
    first = signed.publish("db", src).version
    signed.set_ref("db", "stable", first, expected=None)
    keyless = _store(tmp_path / "store", None)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    write_tree(src, {"new": b"n"})
    plain = _store(tmp_path / "plain", None)  # an unsigned store's version of the same name
    unsigned = plain.publish("db", write_tree(tmp_path / "p", {"p": b"p"})).version
    for call in (
        lambda: keyless.publish("db", src),
        lambda: keyless.set_ref("db", "stable", first, expected=first),
        lambda: keyless.set_ref("db", "latest", first, expected=ANY),
        lambda: keyless.set_ref("db", "new-tag", first, expected=None),  # beside a signed latest
        lambda: sync_version(signed, _store(tmp_path / "mirror", None), "db", first),
        lambda: sync_version(signed, _store(tmp_path / "mirror", None), "db", first, ref=None),
        lambda: sync_version(plain, keyless, "db", unsigned, ref=None),  # into a signed name
    ):
        with pytest.raises(ConfigError, match="signed, and this store has no signing key"):
            call()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert not (tmp_path / "mirror").exists() or not list((tmp_path / "mirror").rglob("refs/*"))
    assert signed.resolve("db").version == first  # every keyed reader still reads it
    assert signed.current_version("db", "stable")[0] == first
    signed.set_ref("db", "new-tag", first, expected=None)  # with the key, all goes on
    assert sync_version(signed, _store(tmp_path / "m2", KEY_A), "db", first) > 0
    plain.set_ref("db", "t", unsigned, expected=None)  # a store never signed: unaffected


def test_tampered_manifest_and_ref(tmp_path: Path, src: Path) -> None:
    store = _store(tmp_path / "store", KEY_A)
    v1 = store.publish("db", src).version
    (src / "evil.pickle").write_bytes(b"cos\nsystem\n")
    v2 = store.publish("db", src).version
    backend = store.backend
    # Replay an old, validly signed ref of "latest" under the "stable" name: refused.
    backend.put(ref_key("db", "stable"), backend.get(ref_key("db", "latest")).data)
    with pytest.raises(IntegrityError, match="mismatch"):
        store.resolve("db", "stable")
    # Point latest elsewhere with a forged signature: refused.
    ref = json.loads(backend.get(ref_key("db", "latest")).data)
    backend.put(ref_key("db", "latest"), canonical_json({**ref, "version": v1}))
    with pytest.raises(IntegrityError, match="mismatch"):
        store.resolve("db")
    # Swap v2's signature onto v1's manifest: the signature covers the bytes and the key.
    backend.put(manifest_key("db", v1) + ".sig", backend.get(manifest_key("db", v2) + ".sig").data)
    with pytest.raises(IntegrityError, match="mismatch"):
        store.resolve("db", v1)


def test_key_rotation(tmp_path: Path, src: Path) -> None:
    old = _store(tmp_path / "store", KEY_A).publish("db", src).version
    rotated = _store(tmp_path / "store", f"{KEY_B},{KEY_A}")  # b signs, a still accepted
    assert rotated.resolve("db", old).version == old
    (src / "more").write_bytes(b"more")
    new = rotated.publish("db", src).version
    assert _store(tmp_path / "store", KEY_B).resolve("db").version == new
    with pytest.raises(IntegrityError):
        _store(tmp_path / "store", KEY_B).resolve("db", old)  # a retired: old versions refused
    assert rotated.prune("db", keep_last=1, min_age=0).deleted_versions == (old,)
    assert not (tmp_path / "store" / manifest_key("db", old)).exists()
    assert not (tmp_path / "store" / (manifest_key("db", old) + ".sig")).exists()


@pytest.mark.parametrize("spec", ["nokey", "a:short", "bad id!:" + "x" * 20, f"{KEY_A},{KEY_A}"])
def test_bad_keys_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="CHROMA_SNAPSHOTS_SIGNING_KEY") as err:
        StoreConfig.from_env(
            {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_SIGNING_KEY": spec}
        )
    assert "secret-number" not in str(err.value)  # never echo a secret


def test_keys_stay_out_of_reprs() -> None:
    cfg = StoreConfig.from_env(
        {"CHROMA_SNAPSHOTS_URL": "s3://b", "CHROMA_SNAPSHOTS_SIGNING_KEY": KEY_A}
    )
    assert "secret" not in repr(cfg)


@pytest.mark.parametrize("opener", ["open_store", "open_remote"])
def test_a_store_opened_by_url_keeps_the_signing_key_of_the_environment(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    # The README's first example names the store by URL; the key configured for the
    # process must still sign what it publishes and refuse what is unsigned.
    import chroma_snapshots.opening as opening

    url = f"file://{tmp_path / 'store'}"
    monkeypatch.delenv("CHROMA_SNAPSHOTS_CACHE_DIR", raising=False)
    unsigned = _store(tmp_path / "store", None).publish("db", src).version
    monkeypatch.setenv("CHROMA_SNAPSHOTS_SIGNING_KEY", KEY_A)
    store = getattr(opening, opener)(url)
    with pytest.raises(IntegrityError, match="not signed"):
        store.resolve("db", unsigned)
    version = store.publish("db2", src).version
    assert (tmp_path / "store" / (manifest_key("db2", version) + ".sig")).is_file()
    # a StoreConfig is taken as it is: no key, so unsigned data reads
    assert getattr(opening, opener)(StoreConfig(url=url)).resolve("db").version == unsigned


@pytest.mark.parametrize("ref", ["latest", "stable"])
def test_an_old_signed_ref_is_refused_after_the_ref_was_deleted_and_made_again(
    tmp_path: Path, src: Path, ref: str
) -> None:
    """An attacker without the key deletes a ref; the key holder's next move made it again
    at generation 1, below every old signed value of it, so writing an old one back was a
    rollback that a reader which had seen the new one accepted (an independent review)."""
    store = _store(tmp_path / "store", KEY_A)
    path = tmp_path / "store" / ref_key("db", ref)
    old: list[tuple[str, bytes]] = []
    for n in range(3):
        (src / "chroma.sqlite3").write_bytes(b"%d" % n * 10000)
        version = store.publish("db", src).version
        if ref != "latest":
            store.set_ref("db", ref, version, expected=None if n == 0 else old[-1][0])
        old.append((version, path.read_bytes()))
    path.unlink()  # the attacker
    (src / "chroma.sqlite3").write_bytes(b"fixed" * 2000)
    fixed = store.publish("db", src).version
    if ref != "latest":
        store.set_ref("db", ref, fixed, expected=None)
    reader = _store(tmp_path / "store", KEY_A)
    assert reader.resolve("db", ref).version == fixed
    for _, value in old:  # each old signed value, written back
        path.write_bytes(value)
        with pytest.raises(IntegrityError, match="went backwards"):
            reader.resolve("db", ref)
    with pytest.raises(IntegrityError, match="went backwards"):
        reader.checkout("db", ref, dest=tmp_path / "out")
    # a process that never saw the new ref accepts the old one: the documented gap
    assert _store(tmp_path / "store", KEY_A).resolve("db", ref).version == old[-1][0]
