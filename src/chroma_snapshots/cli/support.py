"""The commands that check a set-up and show one working: ``doctor`` and ``demo``."""

from __future__ import annotations

from chroma_snapshots.cli.common import (
    DEMO_MOST_MB,
    click,
    config_of,
    demo_size,
    emit,
    seconds_option,
)


def register(cli: click.Group) -> None:
    """Add ``doctor`` and ``demo`` to ``cli``."""
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

    @cli.command(
        help="Check the configuration, the stores (reach, list, write, read, delete, "
        "conditional writes, with timings), the EFS hang guard and the /tmp cache. "
        "Never creates a store. Exit 1 if anything fails."
    )
    @click.option(
        "--budget",
        default="10",
        type=str,  # the callback parses: nan and inf are refused as the variables' are
        metavar="SECONDS",
        callback=seconds_option,
        show_default=True,
        help="Seconds allowed per check.",
    )
    @json_opt
    @click.pass_context
    def doctor(ctx: click.Context, budget: float, as_json: bool) -> None:
        from chroma_snapshots.cli.doctor import diagnose

        found = diagnose(load=lambda: config_of(ctx), budget=budget)
        rows = [
            f"{f.status.upper():<5} {f.check:<48} {f.seconds * 1000:>8.1f} ms  {f.detail}"
            for f in found
        ]
        emit(found, as_json, "\n".join(rows))
        if any(f.status == "fail" for f in found):
            raise click.exceptions.Exit(1)

    @cli.command(help="Run the demo on an embedded local S3 server (needs the 'demo' extra).")
    @click.option(
        "--size-mb",
        default="24",
        show_default=True,
        metavar="MB",
        callback=demo_size,
        help=f"Approximate database size, 1 to {DEMO_MOST_MB}.",
    )
    @json_opt
    def demo(size_mb: int, as_json: bool) -> None:
        from chroma_snapshots.cli.demo import run_demo

        steps = run_demo(size_mb=size_mb, echo=lambda line: click.echo(line, err=as_json))
        if as_json:
            emit(steps, True, "")
