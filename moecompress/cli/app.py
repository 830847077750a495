"""The `moecompress` command: a thin Typer app over library functions.

Each command lives in its own module and registers itself on `app` at import; errors caused
by the user's input (`MoecompressError`, missing files, and usage errors: an unknown command
or option, a bad or missing value) print one `error: ...` line and exit 2. Set
MOECOMPRESS_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

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
COMMAND_MODULES = ("inspect_cmd", "calibrate_cmd", "prune_cmd", "condense_cmd", "route_task_cmd", "quantize_cmd", "compress_cmd", "export_cmd", "eval_cmd", "run_cmd", "recipe_cmd", "demo_cmd")


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
        raise typer.BadParameter(f"unknown log level {log_level!r}; use debug, info, warning or error",
                                 param_hint="'--log-level'")
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


def _debug() -> bool:
    """MOECOMPRESS_DEBUG set (and not 0): let errors propagate with their traceback."""
    return os.environ.get("MOECOMPRESS_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sentence(text: str) -> str:
    """`text` as the middle of an `error:` line: one line, lower-case start, no final full stop."""
    text = _one_line(text).rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _command_names() -> list[str]:
    group = typer.main.get_command(app)
    return [name for name, cmd in getattr(group, "commands", {}).items() if not getattr(cmd, "hidden", False)]


def _help_hint(ctx: Any) -> str:
    """What to run for help: the failing command's --help, else the app's."""
    if ctx is None:  # the option parser raises some errors without a context: find the command in argv
        command = next((arg for arg in sys.argv[1:] if arg in _command_names()), None)
        if command is None:
            return "Run 'moecompress --help' for the list of commands."
        return f"Run 'moecompress {command} --help' for its options."
    if ctx.parent is None:
        return f"Run '{ctx.command_path} --help' for the list of commands."
    return f"Run '{ctx.command_path} --help' for its options."


def _closest(word: str, candidates: list[str]) -> list[str]:
    """The candidates closest to `word` (difflib), best first, only those about as close as the best."""
    import difflib

    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    scored = [(score, c) for score, c in scored if score >= 0.6]
    if len(word) >= 2:  # a prefix ("cal" for calibrate) is close too
        scored += [(1.0, c) for c in candidates if c.startswith(word) and c not in {x for _, x in scored}]
        scored.sort(reverse=True)
    return [c for score, c in scored if score >= scored[0][0] - 0.1][:3] if scored else []


def _did_you_mean(names: list[str]) -> str:
    return "; did you mean " + " or ".join(f"'{n}'" for n in names) + "?" if names else ""


def _no_such_command(err: Any) -> str | None:
    """The line for an unknown command, with the closest command names; None for other errors."""
    import ast

    found = re.match(r"No such command (.+?)\.(?: Did you mean .*)?$", _one_line(err.message))
    ctx = err.ctx
    if found is None or ctx is None or not hasattr(ctx.command, "list_commands"):
        return None
    try:
        name = str(ast.literal_eval(found.group(1)))
    except (ValueError, SyntaxError):
        name = found.group(1)
    group = ctx.command
    commands = [c for c in group.list_commands(ctx) if not getattr(group.get_command(ctx, c), "hidden", False)]
    close = _closest(name, commands)
    if close:
        return f"no such command '{name}'{_did_you_mean(close)} {_help_hint(ctx)}"
    listed = ", ".join(commands)
    return f"no such command '{name}'; the commands are {listed}. Run '{ctx.command_path} --help' for what each does."


def _bad_value(err: Any) -> Any:
    """The value a BadParameter refused, when typer's validation error says (else None)."""
    cause = err.__cause__
    try:
        errors = cause.errors() if cause is not None and hasattr(cause, "errors") else []
        value = errors[0].get("input") if errors else None
    except Exception:  # noqa: BLE001 - only decoration of the message
        return None
    return value if isinstance(value, (str, int, float)) else None


def _param_hint(err: Any) -> str | None:
    """How the error names its parameter: '--ratio' / '-r' for options, MODEL for arguments."""
    if err.param_hint is None and err.param is not None and err.param.param_type_name == "argument":
        return str(err.param.name).upper()
    hint = err.param_hint if err.param_hint is not None else (err.param.get_error_hint() if err.param else None)
    if isinstance(hint, (list, tuple)):
        hint = " / ".join(repr(x) for x in hint)
    return hint


def usage_error_line(err: Any) -> str:
    """The one line (after `error: `) for a click/typer usage error: what is wrong, what to do."""
    ctx = getattr(err, "ctx", None)
    hint = _help_hint(ctx)
    if isinstance(err, _click_errors().NoSuchOption):
        where = f" for '{ctx.command_path}'" if ctx is not None else ""
        close = _closest(err.option_name, list(err.possibilities or []))
        return f"no such option '{err.option_name}'{where}{_did_you_mean(close)}{'' if close else '.'} {hint}"
    if isinstance(err, _click_errors().MissingParameter):
        param = err.param
        if param is None:
            return f"{_sentence(err.format_message())}. {hint}"
        kind = err.param_type or param.param_type_name
        name = _param_hint(err)
        about = _sentence(getattr(param, "help", None) or "")
        return f"missing {kind} {name}{': ' + about if about else ''}. {hint}"
    if isinstance(err, _click_errors().BadParameter):
        param_hint, value = _param_hint(err), _bad_value(err)
        target = " ".join(part for part in ("value", repr(value) if value is not None else None,
                                            f"for {param_hint}" if param_hint else None) if part)
        reason = re.sub(r"^value error, ", "", _sentence(err.message), flags=re.IGNORECASE)
        return f"invalid {target}: {reason}. {hint}"
    line = _no_such_command(err)
    if line is not None:
        return line
    return f"{_sentence(err.format_message())}. {hint}"


def _no_args_line(ctx: Any) -> str:
    """The line after the help that bare `moecompress` (a group run with no arguments) prints."""
    path = ctx.command_path if ctx is not None else "moecompress"
    if ctx is None or hasattr(ctx.command, "list_commands"):
        return f"missing command: choose one of the commands above. Run '{path} COMMAND --help' for its options."
    return f"missing arguments: see the usage above. Run '{path} --help' for its options."


def _prog_name() -> str:
    """How the user ran us, for usage lines and hints: `python -m moecompress` or `moecompress`."""
    return "python -m moecompress" if Path(sys.argv[0]).name == "__main__.py" else "moecompress"


def _click_errors() -> Any:
    """The click exception module typer raises from (typer >= 0.22 vendors click as `typer._click`)."""
    try:
        from typer._click import exceptions
    except ImportError:  # an older typer on top of click
        from click import exceptions
    return exceptions


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages.

    Usage errors (unknown command or option, a value of the wrong type, a missing argument)
    print `error: ...` with what to do and exit 2, as do `MoecompressError`s and missing
    files. Bare `moecompress` prints the help (the list of commands) on stdout, then
    `error: missing command ...` on stderr, and exits 2: click's (and typer's) convention for
    a group run without a command, so a script that forgot the command does not pass.
    MOECOMPRESS_DEBUG=1 lets every error propagate with its traceback instead.
    """
    click_errors = _click_errors()
    try:
        result = app(standalone_mode=False, prog_name=_prog_name())
    except MoecompressError as err:
        if _debug():
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if _debug():
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except click_errors.NoArgsIsHelpError as err:
        if _debug():
            raise
        help_text = err.format_message()  # typer's rich help is already on stdout; plain help comes back here
        if help_text.strip():
            typer.echo(help_text.rstrip("\n"))
        typer.echo(f"error: {_no_args_line(err.ctx)}", err=True)
        sys.exit(2)
    except click_errors.UsageError as err:
        if _debug():
            raise
        typer.echo(f"error: {usage_error_line(err)}", err=True)
        sys.exit(2)
    except click_errors.ClickException as err:  # e.g. a file option that cannot be opened
        if _debug():
            raise
        typer.echo(f"error: {_sentence(err.format_message())}", err=True)
        sys.exit(err.exit_code or 1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    # typer returns the code of a `typer.Exit` (and of --help) when not in standalone mode
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        sys.exit(result)
