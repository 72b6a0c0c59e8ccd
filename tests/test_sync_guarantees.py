"""``sync`` moves the destination's refs by compare-and-swap against what they named when
it began (another writer's move is a ConflictError, never overwritten), and with
``verify`` reads every pack back from the destination and checks every chunk before a
ref moves: a damaged pack already there (trusted by its name otherwise) is an
IntegrityError and the ref stays where it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_inprocess import Run

from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.errors import ConflictError, IntegrityError
from chroma_snapshots.ops import sync as sync_module
from chroma_snapshots.ops.sync import sync_version
from chroma_snapshots.stores.base import ANY
from chroma_snapshots.testing.conformance import write_tree

pytestmark = pytest.mark.usefixtures("clean_env")


def _stores(tmp_path: Path) -> tuple[RemoteStore, RemoteStore, list[str]]:
    """A source with three versions of ``db``, and an empty destination."""
    src = RemoteStore(FileBackend(tmp_path / "src"), chunk_size=4096)
    versions = []
    for i in range(3):
        tree = write_tree(tmp_path / f"t{i}", {"a.bin": bytes([i]) * 20_000, "b": b"x%d" % i})
        versions.append(src.publish("db", tree).version)
    return src, RemoteStore(FileBackend(tmp_path / "dst"), chunk_size=4096), versions


def _damage_a_pack(store: RemoteStore) -> Path:
    root = store.backend.folder()
    assert root is not None
    pack = next(p for p in Path(root.path).rglob("packs/**/*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    return pack


def test_a_ref_moved_by_another_writer_during_a_sync_is_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, (v1, v2, v3) = _stores(tmp_path)
    sync_version(src, dst, "db", v1)
    sync_version(src, dst, "db", v3, ref=None)  # v3 there, latest still v1
    check = sync_module.check_copy

    def another_writer_moves_latest(*args: object) -> None:  # between copy and ref move
        dst.set_ref("db", "latest", v3, expected=ANY)
        check(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sync_module, "check_copy", another_writer_moves_latest)
    with pytest.raises(ConflictError):
        sync_version(src, dst, "db", v2, verify=True)  # began with latest at v1
    assert dst.refs("db")["latest"] == v3  # not overwritten


def test_a_sync_to_a_ref_already_there_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, (v1, _, _) = _stores(tmp_path)
    sync_version(src, dst, "db", v1)

    def no_move(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ref was moved again")

    monkeypatch.setattr(dst, "set_ref", no_move)
    sync_version(src, dst, "db", v1)
    assert dst.refs("db")["latest"] == v1


def test_verify_finds_a_damaged_pack_already_in_the_destination(tmp_path: Path) -> None:
    src, dst, (v1, _, _) = _stores(tmp_path)
    sync_version(src, dst, "db", v1, ref=None)
    _damage_a_pack(dst)
    sync_version(src, dst, "db", v1, ref=None)  # without verify it is trusted by its name
    with pytest.raises(IntegrityError, match="in the destination"):
        sync_version(src, dst, "db", v1, verify=True)
    assert dst.refs("db") == {}  # the ref was not made to name what failed


def test_the_cli_sync_verifies_and_refuses_to_overwrite(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, (v1, v2, v3) = _stores(tmp_path)
    s, d = str(tmp_path / "src"), str(tmp_path / "dst")
    code, _, err = run("sync", s, d, "--verify")
    assert code == 0, err
    assert dst.refs("db") == {"latest": v3}
    _damage_a_pack(dst)
    code, _, err = run("sync", s, d, "--all-versions")
    assert code == 0, err  # trusted by name
    code, _, err = run("sync", s, d, "--all-versions", "--verify")
    assert code == 5, err
    assert "in the destination" in err
    assert len(err.strip().splitlines()) == 1
    assert dst.refs("db") == {"latest": v3}
    for pack in [p for p in (tmp_path / "dst").rglob("packs/**/*") if p.is_file()]:
        pack.unlink()  # the damaged one too: sync copies them again
    # The source rolls back to v1; while the sync copies, another writer moves the
    # destination's latest from v3 to v2: the sync's move (v3 -> v1) is refused.
    src.set_ref("db", "latest", v1, expected=ANY)
    refs_of, moved = RemoteStore.refs, [False]

    def refs_then_a_move(self: RemoteStore, name: str, **kw: object) -> dict[str, str]:
        got = refs_of(self, name, **kw)  # type: ignore[arg-type]
        if self.backend.folder() == dst.backend.folder() and not moved[0]:
            moved[0] = True
            dst.set_ref("db", "latest", v2, expected=ANY)
        return got

    monkeypatch.setattr(RemoteStore, "refs", refs_then_a_move)
    code, _, err = run("sync", s, d)
    assert moved[0]
    assert code == 4, err
    assert "latest" in err
    assert refs_of(dst, "db")["latest"] == v2
    code, _, err = run("sync", s, d)  # run again: it moves
    assert code == 0, err
    assert refs_of(dst, "db")["latest"] == v1


def _two_names(tmp_path: Path) -> tuple[RemoteStore, RemoteStore, dict[str, list[str]]]:
    """Three versions each of ``alpha`` and ``beta`` in the source, all synced to the
    destination; every latest at the second version."""
    src = RemoteStore(FileBackend(tmp_path / "src"), chunk_size=4096)
    versions: dict[str, list[str]] = {}
    for name in ("alpha", "beta"):
        for i in range(3):
            tree = write_tree(tmp_path / f"{name}{i}", {"a.bin": name.encode() * 3000 + bytes([i])})
            versions.setdefault(name, []).append(src.publish(name, tree).version)
        src.set_ref(name, "latest", versions[name][1], expected=ANY)
    dst = RemoteStore(FileBackend(tmp_path / "dst"), chunk_size=4096)
    for name, vs in versions.items():
        for version in vs:
            sync_version(src, dst, name, version, ref=None)
        dst.set_ref(name, "latest", vs[1], expected=None)
    return src, dst, versions


def test_every_ref_is_read_before_anything_is_copied(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, v = _two_names(tmp_path)
    src.set_ref("beta", "latest", v["beta"][0], expected=ANY)  # the sync will want beta[0]
    copy, moved = sync_module.sync_version, [False]

    def another_writer_while_alpha_copies(*args: object, **kwargs: object) -> int:
        if not moved[0]:
            moved[0] = True
            dst.set_ref("beta", "latest", v["beta"][2], expected=ANY)
        return copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sync_module, "sync_version", another_writer_while_alpha_copies)
    code, _, err = run("sync", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert moved[0]
    assert code == 4, err  # beta moved after the sync began (it read beta[1])
    assert dst.refs("beta")["latest"] == v["beta"][2]  # not overwritten


def test_verify_fails_before_any_ref_of_any_name_moves(tmp_path: Path, run: Run) -> None:
    src, dst, v = _two_names(tmp_path)
    src.set_ref("alpha", "latest", v["alpha"][2], expected=ANY)  # alpha's would move
    beta = tmp_path / "dst" / "beta"
    pack = next(p for p in beta.rglob("packs/**/*") if p.is_file())
    pack.write_bytes(pack.read_bytes()[::-1])
    code, _, err = run("sync", str(tmp_path / "src"), str(tmp_path / "dst"), "--verify")
    assert code == 5, err
    assert dst.refs("alpha")["latest"] == v["alpha"][1]  # alpha's ref did not move either


def test_two_syncs_of_one_version_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst, (v1, _, _) = _stores(tmp_path)
    check = sync_module.check_copy

    def the_other_sync_moves_first(*args: object) -> None:
        check(*args)  # type: ignore[arg-type]
        other = RemoteStore(FileBackend(tmp_path / "dst"), chunk_size=4096)
        other.set_ref("db", "latest", v1, expected=None)

    monkeypatch.setattr(sync_module, "check_copy", the_other_sync_moves_first)
    sync_version(src, dst, "db", v1, verify=True)  # no ConflictError: it names v1
    assert dst.refs("db")["latest"] == v1
