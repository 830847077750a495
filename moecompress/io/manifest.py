"""`moecompress_manifest.json`: how an output was made, enough to reproduce it.

Records the operation, method and parameters, seed, the input checkpoint's config hash, the
calibration statistics' digest and data digest, and library versions.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST_FILE = "moecompress_manifest.json"
MANIFEST_VERSION = 1


def build_manifest(operation: str, method: str, params: dict[str, Any], seed: int | None, source: str | Path,
                   source_config: Any, stats: Any | None = None, **extra: Any) -> dict[str, Any]:
    """The manifest dict for an output made from `source` by `operation` with `method`."""
    from moecompress.io.provenance import config_hash, library_versions

    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "operation": operation,
        "method": method,
        "params": params,
        "seed": seed,
        "source": {"path": str(source), "model_type": getattr(source_config, "model_type", None),
                   "config_hash": config_hash(source_config)},
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if stats is not None:
        manifest["calibration"] = {
            "stats_digest": stats.digest(),
            "data_digest": stats.header.data_digest,
            "data": stats.header.data,
            "domains": stats.header.domains,
            "mode": stats.header.mode,
            "seed": stats.header.seed,
        }
    manifest.update(extra)
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest into `folder`."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a folder moecompress wrote, or None."""
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None
