"""Usage errors exit 2 with one `error:` line that says what is wrong and what to do, no traceback.

typer 0.29 vendors click (`typer._click`) and raises its own exception classes, which the
entry point used to miss, so each of these printed a ~25-line traceback and exited 1.

Bare `moecompress` prints the help (with the list of commands) on stdout, then one
`error: missing command ...` line on stderr, and exits 2: the convention of click >= 8.2 (and
of typer's own standalone mode) for a group run without a command, so a script that forgot
the command fails instead of passing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import error_lines, run_cli

REPO = Path(__file__).resolve().parents[2]


def one_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, err)
    (line,) = error_lines(err)
    assert err.strip() == line, f"stderr holds more than the error line:\n{err}"
    assert out == ""
    return line


def test_misspelt_command_suggests_the_closest(monkeypatch, capsys) -> None:
    line = one_error(*run_cli(["prnue"], monkeypatch, capsys))
    assert line == ("error: no such command 'prnue'; did you mean 'prune'? "
                    "Run 'moecompress --help' for the list of commands.")


def test_unknown_command_lists_the_commands(monkeypatch, capsys) -> None:
    line = one_error(*run_cli(["xyzzy"], monkeypatch, capsys))
    assert line.startswith("error: no such command 'xyzzy'; the commands are ")
    listed = line.split("the commands are ", 1)[1].split(". Run", 1)[0].split(", ")
    assert {"inspect", "calibrate", "prune", "quantize", "eval"} <= set(listed)  # registration order may vary
    assert "Run 'moecompress --help'" in line


def test_misspelt_option_suggests_the_closest(monkeypatch, capsys) -> None:
    line = one_error(*run_cli(["prune", "X", "--ratoi", "0.5"], monkeypatch, capsys))
    assert line == ("error: no such option '--ratoi' for 'moecompress prune'; did you mean '--ratio'? "
                    "Run 'moecompress prune --help' for its options.")


def test_value_of_the_wrong_type(monkeypatch, capsys) -> None:
    line = one_error(*run_cli(["prune", "X", "--ratio", "abc"], monkeypatch, capsys))
    assert line.startswith("error: invalid value 'abc' for '--ratio': input should be a valid number")
    assert line.endswith("Run 'moecompress prune --help' for its options.")


def test_missing_argument(monkeypatch, capsys) -> None:
    line = one_error(*run_cli(["prune"], monkeypatch, capsys))
    assert line == ("error: missing argument MODEL: local Hugging Face checkpoint folder (config.json + "
                    "safetensors). Run 'moecompress prune --help' for its options.")


def test_missing_required_option(monkeypatch, capsys, tmp_path) -> None:
    line = one_error(*run_cli(["calibrate", str(tmp_path)], monkeypatch, capsys))
    assert line.startswith("error: missing option '--output' / '-o'")
    assert line.endswith("Run 'moecompress calibrate --help' for its options.")


@pytest.mark.parametrize("args, expected", [
    (["prune", "X", "--ratio"], "error: option '--ratio' requires an argument. Run 'moecompress prune --help'"),
    (["prune", "X", "Y"], "error: got unexpected extra argument"),
    (["--log-level", "loud", "inspect", "X"], "error: invalid value for '--log-level': unknown log level 'loud'"),
    (["recipe", "nope", "r.yaml"], "error: invalid value 'nope' for ACTION: 'nope' is not one of 'validate', 'show'"),
])
def test_other_usage_errors(args, expected, monkeypatch, capsys) -> None:
    line = one_error(*run_cli(args, monkeypatch, capsys))
    assert line.startswith(expected)


def test_bare_command_prints_the_help_and_exits_2(monkeypatch, capsys) -> None:
    code, out, err = run_cli([], monkeypatch, capsys)
    assert code == 2
    assert "Usage:" in out and "calibrate" in out and "prune" in out and "quantize" in out
    (line,) = error_lines(err)
    assert err.strip() == line
    assert line == ("error: missing command: choose one of the commands above. "
                    "Run 'moecompress COMMAND --help' for its options.")


def test_help_still_exits_0(monkeypatch, capsys) -> None:
    code, out, err = run_cli(["prune", "--help"], monkeypatch, capsys)
    assert code == 0 and "--ratio" in out and err == ""


def test_debug_shows_the_traceback(monkeypatch, capsys) -> None:
    from typer._click.exceptions import NoSuchOption, UsageError

    monkeypatch.setenv("MOECOMPRESS_DEBUG", "1")
    with pytest.raises(UsageError, match="No such command 'prnue'"):
        run_cli(["prnue"], monkeypatch, capsys)
    with pytest.raises(NoSuchOption):
        run_cli(["prune", "X", "--ratoi", "0.5"], monkeypatch, capsys)


def run_module(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MOECOMPRESS_DEBUG"}
    environ.update(HF_HUB_OFFLINE="1", COLUMNS="120", **env)
    return subprocess.run([sys.executable, "-m", "moecompress", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)


def test_real_process_prints_one_line_and_no_traceback() -> None:
    done = run_module(["prnue"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: no such command 'prnue'; did you mean 'prune'? "
        "Run 'python -m moecompress --help' for the list of commands."
    ]
    assert done.stdout == ""
    missing = run_module(["prune"])
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert [line for line in missing.stderr.splitlines() if line] == [line for line in missing.stderr.splitlines()
                                                                      if line.startswith("error: missing argument")]


def test_real_process_with_debug_shows_the_traceback() -> None:
    done = run_module(["prnue"], MOECOMPRESS_DEBUG="1")
    assert done.returncode != 0 and "Traceback" in done.stderr and "No such command 'prnue'" in done.stderr
