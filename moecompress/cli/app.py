"""The `moecompress` command: a thin Typer app over library functions.

Each command lives in its own module and registers itself on `app` at import; errors caused
by the user's input (`MoecompressError`, missing files) print one line and exit 2. Set
MOECOMPRESS_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from moecompress.errors import MoecompressError

app = typer.Typer(
    name="moecompress",
    help="Compress Hugging Face Mixture-of-Experts checkpoints: inspect, calibrate, evaluate, prune, quantise.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

QUIET_LOGGERS = ("accelerate.big_modeling", "torchao", "torchao.kernel.intmm", "torch.utils._pytree")

# Command modules, in the order `--help` lists them. Each defines its command(s) on `app`.
COMMAND_MODULES = ("inspect_cmd", "calibrate_cmd", "prune_cmd", "condense_cmd", "route_task_cmd", "quantize_cmd", "compress_cmd", "eval_cmd", "run_cmd", "recipe_cmd", "demo_cmd")


@app.callback()
def _root(
    log_level: str = typer.Option(
        "warning", "--log-level", help="Logging level: debug, info, warning or error.", envvar="MOECOMPRESS_LOG_LEVEL"
    ),
) -> None:
    """Compress Hugging Face Mixture-of-Experts checkpoints.

    Every command works offline on local checkpoint folders. Run `moecompress COMMAND --help`
    for its options and an example.
    """
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}; use debug, info, warning or error")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        # Expected, harmless notices from dependencies: offloaded layers sit on the meta device
        # by design while streaming; torchao (pulled in by optional extras) probes GPU kernels and
        # registers types with torch.utils._pytree, which logs a deprecation notice.
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"moecompress.cli.{name}")


_register_commands()


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages."""
    try:
        app(standalone_mode=False)
    except MoecompressError as err:
        if os.environ.get("MOECOMPRESS_DEBUG"):
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("MOECOMPRESS_DEBUG"):
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors and exits
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise

