"""The local Lambda example runs end to end: messages in, results out, poison to the DLQ."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chroma_snapshots.testing import MotoServer

EXAMPLE = Path(__file__).parent.parent / "examples" / "lambda" / "run_local.py"


def test_local_lambda_example(moto_server: MotoServer, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("run_local", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.run(moto_server, tmp_path)
    good = {mid for mid, body in out["sent"].items() if body.startswith("{")}
    assert set(out["results"]) == good  # every query answered once
    assert all(len(r["ids"][0]) == 2 for r in out["results"].values())
    assert out["dead_letters"] == ["this is not JSON"]  # after maxReceiveCount receives
    assert out["invocations"][0] == {"received": 4, "failed": 1}
