"""Routing statistics on disk: safetensors tensors plus a JSON header, never pickle.

A stats folder holds `stats.safetensors` (one float64 tensor per (statistic, layer, domain),
named ``"{statistic}/{layer}/{domain}"``) and `stats.json` (the `StatsHeader`). The header
records the model's config hash so statistics are never applied to a different model, the
calibration data digest, token counts and library versions.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.errors import MoecompressError
from moecompress.io.provenance import config_hash

FORMAT_VERSION = 1
TENSORS_FILE = "stats.safetensors"
HEADER_FILE = "stats.json"

# Statistics combined across domains by max instead of sum.
MAX_STATISTICS = frozenset({"max_act"})

class StatsHeader(BaseModel):
    """Everything needed to trust and reuse a statistics file."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model_type: str
    config_hash: str
    model_path: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    intermediate_size: int
    domains: list[str]
    statistics: list[str]
    tokens: dict[str, dict[str, int]]  # layer -> domain -> tokens seen by the router
    data_digest: str
    data: dict[str, Any]
    mode: str  # "layerwise" or "whole-model"
    seed: int
    versions: dict[str, str]
    created: str = ""


class RoutingStats:
    """Per-(statistic, layer, domain) tensors with their header."""

    def __init__(self, header: StatsHeader, tensors: dict[str, torch.Tensor]) -> None:
        self.header = header
        self.tensors = tensors

    @staticmethod
    def key(statistic: str, layer: int, domain: str) -> str:
        """Tensor name inside the safetensors file."""
        return f"{statistic}/{layer}/{domain}"

    def has(self, statistic: str) -> bool:
        """True when the statistic was collected."""
        return statistic in self.header.statistics

    def get(self, statistic: str, layer: int, domain: str | None = None) -> torch.Tensor:
        """The statistic for one layer: one domain's, or combined over all domains (domain=None).

        Shapes: (E,) for per-expert statistics, (E, I) for per-neuron ones, (E, H) for mean_output. Sums
        are float64.
        """
        if not self.has(statistic):
            raise MoecompressError(
                f"statistic {statistic!r} was not collected in these stats "
                f"(have: {', '.join(self.header.statistics)}); re-run calibrate with it enabled"
            )
        if layer not in self.header.moe_layers:
            raise MoecompressError(f"layer {layer} is not a MoE layer of this model (MoE layers: {self.header.moe_layers})")
        domains = self.header.domains if domain is None else [domain]
        for name in domains:
            if name not in self.header.domains:
                raise MoecompressError(f"unknown calibration domain {name!r}; stats have: {', '.join(self.header.domains)}")
        parts = [self.tensors[self.key(statistic, layer, name)] for name in domains]
        if statistic in MAX_STATISTICS:
            return torch.stack(parts).amax(dim=0)
        return torch.stack(parts).sum(dim=0)

    def tokens(self, layer: int, domain: str | None = None) -> int:
        """Tokens the layer's router saw (one domain or all)."""
        per_domain = self.header.tokens[str(layer)]
        return sum(per_domain.values()) if domain is None else per_domain[domain]

    def digest(self) -> str:
        """sha256 over the header and every tensor: identifies these exact statistics."""
        sha = hashlib.sha256(self.header.model_dump_json(exclude={"created"}).encode())
        for name in sorted(self.tensors):
            sha.update(name.encode())
            sha.update(self.tensors[name].contiguous().numpy().tobytes())
        return sha.hexdigest()

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write stats.safetensors + stats.json into `folder` (created if needed)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if not self.header.created:
            self.header.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # one metadata key: safetensors writes its metadata map in no fixed order, so two keys could
        # give two byte layouts of the same statistics (the format version is in stats.json)
        save_file({k: self.tensors[k].contiguous() for k in sorted(self.tensors)}, str(out / TENSORS_FILE),
                  metadata={"format": "moecompress-stats"})
        (out / HEADER_FILE).write_text(self.header.model_dump_json(indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path, expect_config: Any | None = None) -> RoutingStats:
        """Read a stats folder; with `expect_config`, refuse stats made on a different model."""
        from pydantic import ValidationError
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from moecompress.unfinished import refuse_unfinished

        src = Path(folder)
        refuse_unfinished(src)
        header_file, tensor_file = src / HEADER_FILE, src / TENSORS_FILE
        if not header_file.is_file() or not tensor_file.is_file():
            raise MoecompressError(
                f"{src} is not a moecompress stats folder (needs {HEADER_FILE} and {TENSORS_FILE}); "
                "create one with `moecompress calibrate`"
            )
        try:
            header = StatsHeader.model_validate_json(header_file.read_text())
        except ValidationError as err:
            raise MoecompressError(f"{header_file} is not a valid stats header: {err.errors()[0]['msg']}") from None
        if header.format_version != FORMAT_VERSION:
            raise MoecompressError(
                f"{src} has stats format {header.format_version}; this moecompress reads {FORMAT_VERSION}: re-run calibrate"
            )
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError) as err:
            raise MoecompressError(f"{tensor_file} is corrupt ({err}); re-run calibrate") from None
        if expect_config is not None:
            actual = config_hash(expect_config)
            if actual != header.config_hash:
                raise MoecompressError(
                    f"stats in {src} were collected on a different model (config hash {header.config_hash[:12]} "
                    f"!= {actual[:12]}); re-run calibrate on this checkpoint"
                )
        return cls(header, tensors)
