"""docs/cli.md is generated from the Typer app; this fails when it drifts."""

from pathlib import Path

from moecompress.cli.reference import render


def test_cli_reference_is_up_to_date() -> None:
    committed = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run `python -m moecompress.cli.reference > docs/cli.md`"


def test_every_command_has_an_example_in_help() -> None:
    import typer

    from moecompress.cli.app import app

    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        assert "Example" in (command.help or ""), f"`moecompress {name} --help` has no example"
