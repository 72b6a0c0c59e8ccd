"""Backends plug in by URL scheme: ``register_backend`` and the entry-point group."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import thirdparty_backend
from thirdparty_backend import TaggedBackend

from chroma_snapshots import ConfigError, InvalidInputError, RemoteStore, open_backend
from chroma_snapshots.backends import _REGISTRY, register_backend, registered_schemes
from chroma_snapshots.testing.conformance import read_tree, write_tree


@pytest.fixture
def tagged() -> Iterator[str]:
    """The scheme ``tagged`` registered for one test."""
    saved = dict(_REGISTRY)
    register_backend("tagged", "thirdparty_backend:open_tagged", extra="tagged-backend")
    yield "tagged"
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_a_registered_scheme_opens_with_its_factory_and_own_options(tagged: str) -> None:
    assert "tagged" in registered_schemes()
    backend = open_backend("tagged://one", tag="blue", create=False)
    assert isinstance(backend, TaggedBackend)
    assert backend.tag == "blue"
    # the options common to every backend stay out of a factory's own keyword arguments
    assert thirdparty_backend.OPENED[-1] == ("tagged://one", {"tag": "blue"})
    assert open_backend("tagged://one") is backend


def test_a_store_on_a_third_party_backend_round_trips(tagged: str, tmp_path: Path) -> None:
    store = RemoteStore(open_backend(f"tagged://{uuid.uuid4().hex}"), chunk_size=4096)
    src = write_tree(tmp_path / "src", {"a.bin": b"x" * 10_000, "d/b.bin": b"y"})
    info = store.publish("db", src)
    snap = store.checkout("db", dest=tmp_path / "out")
    assert snap.info.version == info.version
    assert read_tree(snap.path) == read_tree(src)


def test_registration_is_checked(tagged: str) -> None:
    with pytest.raises(InvalidInputError, match="already registered"):
        register_backend("tagged", "thirdparty_backend:open_tagged")
    for bad in ("9bad", "MyFS", "a b"):  # urlsplit lowercases schemes: MyFS could never open
        with pytest.raises(InvalidInputError, match="not a lowercase URL scheme"):
            register_backend(bad, "thirdparty_backend:open_tagged")
    for bad in ("thirdparty_backend.open_tagged", "a..b:f", "a.:f", ":f"):
        with pytest.raises(InvalidInputError, match=r"package\.module:function"):
            register_backend("other", bad)
    register_backend("tagged", "thirdparty_backend:open_tagged", replace=True)


def test_a_missing_package_or_factory_is_a_config_error_naming_the_fix(tagged: str) -> None:
    register_backend("gone", "no_such_package_xyz.backend:make", extra="gone-backend")
    with pytest.raises(ConfigError, match="pip install 'gone-backend'"):
        open_backend("gone://x")
    register_backend("typo", "thirdparty_backend:no_such_factory")
    with pytest.raises(ConfigError, match="does not exist"):
        open_backend("typo://x")


def test_an_installed_entry_point_registers_its_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package that declares ``[project.entry-points."chroma_snapshots.backends"]``
    ``viaep = "thirdparty_backend:open_tagged"`` works once installed, with no import."""
    dist = tmp_path / "viaep_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: viaep-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[chroma_snapshots.backends]\nviaep = thirdparty_backend:open_tagged\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = dict(_REGISTRY)
    try:
        assert "viaep" not in registered_schemes()
        assert isinstance(open_backend("viaep://x", tag="ep"), TaggedBackend)
        assert "viaep" in registered_schemes()
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def test_a_factory_that_fails_is_a_config_error_naming_it(tagged: str) -> None:
    register_backend("broken", "thirdparty_backend:open_broken")
    with pytest.raises(ConfigError, match=r"thirdparty_backend:open_broken.*own bug"):
        open_backend("broken://x")
    register_backend("nothing", "thirdparty_backend:open_nothing")
    with pytest.raises(ConfigError, match="not a Backend"):
        open_backend("nothing://x")
