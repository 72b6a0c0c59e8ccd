"""The package's structure: no import cycles (lazy, type-only or not), and the layers only
import downwards. Read with ``ast``, so an import inside a function or under
``TYPE_CHECKING`` counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import chroma_snapshots

ROOT = Path(chroma_snapshots.__file__).parent

# Lower layers never import higher ones (docs/ARCHITECTURE.md).
LAYERS = [
    {"errors", "engine"},
    {"backends"},
    {"stores", "ops"},
    {"config", "values", "opening", "chroma", "compaction", "locking"},
    {"aws_lambda", "cli", "testing", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


NAMED = re.compile(r"chroma_snapshots(\.\w+)+(:\w+)?")


def imports_of(path: Path) -> set[str]:
    """Every chroma_snapshots module ``path`` imports, anywhere in the file: import
    statements, and strings that name a module (``importlib.import_module("...")``,
    ``__import__``, a registry's ``"module:factory"``), so a lazy import by name counts."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value.split(":")[0]] if NAMED.fullmatch(node.value) else []
        else:
            continue
        found.update(n for n in names if n.startswith("chroma_snapshots"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        # "from pkg import mod" names a module; "from mod import func" names its module
        targets = {t if t in modules else t.rsplit(".", 1)[0] for t in imports_of(path)}
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()) or [])


def test_imports_by_name_count(tmp_path: Path) -> None:
    lazy = tmp_path / "lazy.py"
    lazy.write_text(
        'import importlib\nx = importlib.import_module("chroma_snapshots.cli.main")\n'
        'y = __import__("chroma_snapshots.config")\n'
        'REG = {"s3": "chroma_snapshots.engine.keys:f"}\n'
    )
    assert imports_of(lazy) == {
        "chroma_snapshots.cli.main",
        "chroma_snapshots.config",
        "chroma_snapshots.engine.keys",
    }


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_only_import_downwards() -> None:
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if b.startswith("chroma_snapshots.") and layer_of(b) > layer_of(a)
    ]
    assert not wrong, wrong


def test_no_caller_outside_the_cache_tests_for_a_cached_store() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if "cache" not in p.relative_to(ROOT).parts
        and "isinstance" in p.read_text()
        and any(
            isinstance(n, ast.Call)
            and getattr(n.func, "id", None) == "isinstance"
            and "CachedStore" in ast.unparse(n)
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert not offenders, offenders


def test_every_public_name_resolves() -> None:
    # the package imports its names lazily, by module path: a moved function must not leave
    # a name that fails only when a user first touches it
    for name in chroma_snapshots.__all__:
        assert getattr(chroma_snapshots, name) is not None, name
    assert "open_store" in dir(chroma_snapshots)
