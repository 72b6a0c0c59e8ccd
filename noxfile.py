"""nox sessions: tests, lint, typecheck, demo, bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (starts its own local S3 server)."""
    session.install("-e", ".[dev]", "-c", "constraints.txt")
    session.run("pip", "check")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and tests."""
    session.install("-e", ".[dev]", "-c", "constraints.txt")
    session.run("mypy")


@nox.session
def infra(session: nox.Session) -> None:
    """The Pulumi example's offline tests (mocks; no cloud, no pulumi CLI), in their own venv."""
    session.install("-e", ".", "-c", "constraints.txt")
    session.install("-r", "examples/infra/requirements.txt", "pytest", "-c", "constraints.txt")
    # the library's addopts (two processes) need pytest-xdist, which this venv leaves out
    session.run("pytest", "-q", "examples/infra/tests", "-p", "no:cacheprovider", "-o", "addopts=")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's demo."""
    session.install("-e", ".[demo]")
    session.run("chroma-snapshots", "demo")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; JSON goes to benchmarks/out/ (benchmarks/RESULTS.md records the results)."""
    session.install("-e", ".[dev]", "-c", "constraints.txt")
    # compiled as pip compiles an installed wheel: with PYTHONDONTWRITEBYTECODE set, every
    # checkout process would otherwise compile the package (~0.1 CPU s users do not pay)
    session.run("python", "-m", "compileall", "-q", "src/chroma_snapshots")
    session.run("benchmarks/install-tools.sh", external=True)
    sizes = session.posargs[0] if session.posargs else "256,1024,3072"
    # five rounds where a round is quick: the CPU and ratio cells of the smaller sizes swing
    # by more than their margins from one run to the next (benchmarks/RESULTS.md)
    rounds = ",".join("5" if int(mib) <= 1024 else "3" for mib in sizes.split(","))
    session.run(
        "python",
        "benchmarks/compare.py",
        "--sizes-mb",
        sizes,
        "--json",
        "benchmarks/out/compare.json",
        "--plot",
        "benchmarks/figures/scaling.png",
        "--one-core",
        "--rounds",
        rounds,
    )
    # the measured bound of a verifying receive: bare clients (boto3, awscrt, obstore) and s5cmd
    session.run(
        "python",
        "benchmarks/receive_bound.py",
        "--sizes-gib",
        "1,3",
        "--rounds",
        "3",
        "--one-core",
        "--json",
        "benchmarks/out/receive_bound.json",
    )
    session.run(
        "python",
        "benchmarks/transfer.py",
        "--size-mb",
        "1024",
        "--json",
        "benchmarks/out/transfer-1024.json",
    )
    session.run(
        "python",
        "benchmarks/live_copy.py",
        "--copies",
        "20",
        "--json",
        "benchmarks/out/live_copy.json",
    )
    session.run(
        "python",
        "benchmarks/chunk_size.py",
        "--records",
        "20000",
        "--added",
        "10",
        "--json",
        "benchmarks/out/chunk_size.json",
    )
    # the format issue's targets: +100 and +1,000 records into 50,000, a 1% scattered change
    # of 4 KiB pages, and the manifest of 100,000 small files; then their publish time
    session.run(
        "python",
        "benchmarks/compaction.py",
        "--records",
        "50000",
        "--added",
        "100,1000",
        "--json",
        "benchmarks/out/compaction.json",
    )
    for extra in (["--scattered-mib", "512"], ["--small-files", "100000"]):
        out = f"benchmarks/out/compaction-{extra[0][2:]}.json"
        session.run("python", "benchmarks/compaction.py", *extra, "--json", out)
    session.run(
        "python",
        "benchmarks/publish_stages.py",
        "--store",
        "s3",
        "--json",
        "benchmarks/out/publish_stages.json",
    )
    session.run(
        "python",
        "benchmarks/publish_baseline.py",
        "--json",
        "benchmarks/out/publish_baseline.json",
    )
    session.run("python", "benchmarks/placement.py", "--json", "benchmarks/out/placement.json")
    # benchmarks/efs.py needs root and FUSE. The commands of every table: docs/EVIDENCE.md.


RELIABILITY = [
    "tests/test_faults.py",
    "tests/test_integrity.py",
    "tests/test_fuzz.py",
    "tests/test_soak.py",
    "tests/test_resources.py",
    "tests/test_signing.py",
    "tests/test_concurrency.py::test_killed_publisher_never_leaves_a_broken_latest",
    "tests/test_cache.py::test_sigkill_during_materialization_never_serves_a_partial_tree",
    "tests/test_compaction.py::test_killed_compactor_loses_nothing_and_recovers",
    "tests/test_model_state.py",
    "tests/test_interleavings.py",
    "tests/test_cache_guarantees.py",
]


@nox.session
def reliability(session: nox.Session) -> None:
    """The long reliability suite (bounded, ~55 min on 2 cores): more fault runs, 120+
    crashes, a longer soak, more fuzzing, every pair of step counts in the interleavings.
    Outcome counts go to benchmarks/out/reliability/ (docs/RELIABILITY.md)."""
    session.install("-e", ".[dev]", "-c", "constraints.txt")
    env = {
        "CHROMA_SNAPSHOTS_RELIABILITY": "long",
        "CHROMA_SNAPSHOTS_FIGURES": "benchmarks/out/reliability",
    }
    session.run("pytest", "-q", *RELIABILITY, *session.posargs, env=env)
