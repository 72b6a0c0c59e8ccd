"""Examples for every command's ``--help`` and the ``completion`` command."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

# Shown under each command's --help; one table so every command has some.
EXAMPLES: dict[str, list[str]] = {
    "publish": [
        "chroma-snapshots --store s3://bkt/snaps publish receipts ./chroma -m 'nightly'",
        "chroma-snapshots publish receipts ./chroma --dry-run      # what would be uploaded",
        "chroma-snapshots publish receipts ./chroma --expected none   # name must be new",
        "chroma-snapshots --store ./store publish receipts ./chroma   # a plain path: local folder",
    ],
    "status": [
        "chroma-snapshots --store s3://bkt/snaps status receipts ./chroma",
        "chroma-snapshots status receipts ./chroma --json",
    ],
    "checkout": [
        "chroma-snapshots --store s3://bkt/snaps checkout receipts --dest /tmp/db",
        "chroma-snapshots checkout receipts 20261129T0729 --dest /tmp/db   # a unique id prefix",
        "chroma-snapshots --cache-dir /tmp/cs checkout receipts stable --json",
        "CHROMA_SNAPSHOTS_OFFLINE=1 chroma-snapshots --cache-dir /tmp/cs checkout receipts",
        "CHROMA_SNAPSHOTS_SIGNING_KEY=k1:... chroma-snapshots --store s3://bkt/snaps checkout "
        "receipts   # --store replaces only the URL: the key still applies",
    ],
    "ls": [
        "chroma-snapshots ls",
        "chroma-snapshots ls receipts          # versions: id, date, size, files, refs, message",
        "chroma-snapshots --profile prod --region eu-west-1 ls receipts --json",
    ],
    "info": [
        "chroma-snapshots info receipts",
        "chroma-snapshots info receipts 1a2b3c4d   # a unique prefix of the id's digest",
        "chroma-snapshots info receipts latest --chroma",
    ],
    "diff": ["chroma-snapshots diff receipts stable latest --json"],
    "verify": ["chroma-snapshots verify receipts 20261129T072900123456Z-1a2b3c4d5e6f"],
    "tag": [
        "chroma-snapshots tag receipts stable latest",
        "chroma-snapshots tag receipts stable 20261129T072900123456Z-1a2b3c4d5e6f --move --json",
    ],
    "rollback": [
        "chroma-snapshots rollback receipts stable",
        "chroma-snapshots rollback receipts 1a2b3c",
    ],
    "prune": [
        "chroma-snapshots prune receipts --keep-last 5            # dry run",
        "chroma-snapshots prune receipts --keep-last 5 --apply",
    ],
    "sync": ["chroma-snapshots sync s3://bkt/snaps efs:///mnt/chroma/store receipts"],
    "cache": [
        "chroma-snapshots cache ls",
        "chroma-snapshots cache rm receipts --dry-run",
        "chroma-snapshots cache rm receipts 20261129T0729",
        "chroma-snapshots cache clear --dry-run",
        "chroma-snapshots cache verify",
    ],
    "doctor": [
        "CHROMADB_STORAGE_MODE=auto CHROMADB_BUCKET=bkt chroma-snapshots doctor --json",
        "chroma-snapshots --store s3://bkt/snaps doctor   # also: does it honour If-None-Match?",
        "chroma-snapshots --endpoint-url http://127.0.0.1:9000 --store s3://bkt/x doctor",
    ],
    "demo": ["chroma-snapshots demo", "chroma-snapshots demo --size-mb 16"],
    "completion": [
        "chroma-snapshots completion bash > ~/.local/share/bash-completion/completions/"
        "chroma-snapshots",
        'eval "$(chroma-snapshots completion zsh)"',
    ],
}


def add_examples(cli: click.Group) -> None:
    """Append each command's examples to its --help (``\\b`` keeps click from rewrapping)."""
    for name, cmd in cli.commands.items():
        lines = EXAMPLES.get(name, [])
        _set_examples(cmd, lines)
        if isinstance(cmd, click.Group):  # cache ls, cache rm, ...: the group's lines for each
            for sub_name, sub in cmd.commands.items():
                _set_examples(sub, [line for line in lines if f" {name} {sub_name}" in line])


def _set_examples(cmd: click.Command, lines: list[str]) -> None:
    if lines:
        cmd.epilog = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def register_completion(cli: click.Group) -> None:
    """Add ``completion SHELL``: prints the script that completes commands and options."""

    @cli.command(help="Print the shell completion script for bash, zsh or fish.")
    @click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
    def completion(shell: str) -> None:
        comp_cls = get_completion_class(shell)
        if comp_cls is None:  # click knows all three; guard against a future removal
            raise click.UsageError(f"no completion support for {shell}")
        comp = comp_cls(cli, {}, "chroma-snapshots", "_CHROMA_SNAPSHOTS_COMPLETE")
        click.echo(comp.source())
