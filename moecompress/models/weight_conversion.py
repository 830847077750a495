"""transformers' own checkpoint-key conversions, applied to part of a model at a time.

transformers 5 stores most MoE experts on disk under per-expert names
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) and
fuses them into 3-D parameters while loading (`gate_up_proj (E, 2I, H)`), through a
per-architecture list of `WeightRenaming` / `WeightConverter` rules. This module is the one
place moecompress calls that machinery (`transformers.core_model_loading`, pinned with
transformers): it renames disk keys to module keys, and loads a subset of the disk tensors
(one decoder layer) into a meta-device model with the same conversions `from_pretrained`
would apply, so the result is the module `from_pretrained` would have built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    convert_and_load_state_dict_in_model,
    rename_source_key,
)
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging


@dataclass
class KeyMap:
    """Disk key -> module key, for one model class and its conversion rules."""

    mapping: list[Any]
    base_model_prefix: str
    module_keys: set[str]
    _renamings: list[Any] = field(default_factory=list)
    _converters: list[Any] = field(default_factory=list)
    _lookup: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._renamings = [rule for rule in self.mapping if isinstance(rule, WeightRenaming)]
        self._converters = [rule for rule in self.mapping if isinstance(rule, WeightConverter)]
        self._lookup = dict.fromkeys(self.module_keys, True)  # rename_source_key asks `.get(key) is not None`

    def module_key(self, disk_key: str) -> str | None:
        """The parameter or buffer of the model that `disk_key` feeds (after conversion), or None."""
        renamed, _ = rename_source_key(disk_key, self._renamings, self._converters, self.base_model_prefix,
                                       self._lookup)
        if renamed not in self.module_keys and disk_key in self.module_keys:
            renamed = disk_key
        return renamed if renamed in self.module_keys else None


def key_map(model: nn.Module) -> KeyMap:
    """The disk -> module key map of a (meta) model, with transformers' rules for its class."""
    return KeyMap(get_model_conversion_mapping(model), model.base_model_prefix, set(model.state_dict().keys()))


@dataclass
class LoadReport:
    """What loading a subset of disk tensors set, and what did not fit."""

    loaded: set[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], keys: KeyMap, device: torch.device | str,
              expected: set[str]) -> LoadReport:
    """Load disk tensors (by disk key) into `model`, converted as `from_pretrained` converts them.

    Each parameter takes the dtype the (meta) model declares for it. `expected` are the module
    keys these tensors should fill; the report lists which were set and any shape mismatch.
    """
    config = LoadStateDictConfig(device_map={"": str(device)}, dtype=None, weight_mapping=list(keys.mapping))
    # transformers prints a progress bar per call ("Loading weights"); one per layer is noise here
    previous = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model, dict(tensors), config)
    finally:
        if previous:
            hf_logging.enable_progress_bar()
    missing = set(info.missing_keys) & expected
    mismatched = [(name, tuple(got), tuple(want)) for name, got, want in info.mismatched_keys]
    return LoadReport(loaded=expected - missing, mismatched=mismatched)
