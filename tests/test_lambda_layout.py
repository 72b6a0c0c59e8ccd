"""A Lambda deployed as a zip: the runtime's bootstrap puts the function's code (/var/task)
and its layers on ``sys.path`` itself, and ``PYTHONPATH`` names only the runtime. The
children this package starts (the hang guard's filesystem worker, validate's chroma
probe) must import it there too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from chroma_helpers import build, close_client

# the interpreter this venv was made from: it has none of the project's packages, as a
# Lambda runtime's python has none of the function's
BASE = sys._base_executable  # type: ignore[attr-defined]

BOOTSTRAPPED = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])  # as Lambda's bootstrap adds /var/task
from chroma_snapshots import RemoteStore
from chroma_snapshots.backends.file import FileBackend
from chroma_snapshots.chroma import validate
from chroma_snapshots.engine.guard import MountGuard
from chroma_snapshots.testing.conformance import write_tree

from pathlib import Path
root, tree, db = map(Path, sys.argv[2:])
store = RemoteStore(FileBackend(root, guard=MountGuard("efs")))
info = store.publish("t", write_tree(tree, {"a": b"x" * 10}))
print(json.dumps({"versions": [v.version for v in store.versions("t")],
                  "published": info.version,
                  "records": validate(db).records}))
"""


def test_children_import_the_package_from_a_bootstrapped_sys_path(tmp_path: Path) -> None:
    assert sys.prefix != sys.base_prefix, "the tests run in a venv (.ci/run makes one)"
    bare = subprocess.run([BASE, "-c", "import chroma_snapshots"], capture_output=True)
    assert bare.returncode != 0, "the base interpreter must not have the package"
    close_client(build(tmp_path / "db", {"receipts": 200}, dim=8))
    (tmp_path / "remote").mkdir()
    argv = [BASE, "-c", BOOTSTRAPPED, json.dumps(sys.path)]
    argv += [str(tmp_path / "remote"), str(tmp_path / "tree"), str(tmp_path / "db")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["versions"] == [out["published"]]
    assert out["records"] == 200
