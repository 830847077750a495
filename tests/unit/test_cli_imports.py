"""Every CLI command module imports on its own, first, in a fresh interpreter (no import cycles)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moecompress.cli.app import COMMAND_MODULES


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_command_module_imports_first(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import moecompress.cli.{module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
