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

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    ConversionOps,
    MergeModulelist,
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


class _MergeInto(ConversionOps):
    """`MergeModulelist(dim=0)` then `Concatenate(dim)`, written into one preallocated tensor.

    transformers stacks each source (e.g. all experts' gate_proj, then all up_proj) and then
    concatenates the stacks, holding the fused tensor about twice while a layer loads; this
    fills the fused tensor directly, one expert's slice at a time. Same values (tested against
    `from_pretrained` on every architecture).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                **kwargs: Any) -> dict[str, torch.Tensor]:
        groups = [input_dict.pop(pattern) for pattern in source_patterns if pattern in input_dict]
        first = groups[0][0]
        widths = [group[0].shape[self.dim - 1] for group in groups]
        shape = [len(groups[0]), *first.shape]
        shape[self.dim] = sum(widths)
        out = torch.empty(shape, dtype=first.dtype, device=first.device)  # (E, ..., sum of widths, ...)
        offset = 0
        for group, width in zip(groups, widths):
            part = out.narrow(self.dim, offset, width)
            for expert, tensor in enumerate(group):
                part[expert].copy_(tensor)
            offset += width
        return {target_patterns[0]: out}


def _filled_in_place(rule: Any) -> Any:
    """A converter that stacks and concatenates experts, rewritten to fill the fused tensor directly."""
    if not isinstance(rule, WeightConverter) or len(rule.operations) != 2 or len(rule.target_patterns) != 1:
        return rule
    merge, concat = rule.operations
    if (type(merge) is not MergeModulelist or merge.dim != 0 or type(concat) is not Concatenate
            or concat.dim < 1):
        return rule
    rewritten = copy.copy(rule)
    rewritten.operations = [_MergeInto(concat.dim)]
    return rewritten


def key_map(model: nn.Module) -> KeyMap:
    """The disk -> module key map of a (meta) model, with transformers' rules for its class."""
    return KeyMap(get_model_conversion_mapping(model), model.base_model_prefix, set(model.state_dict().keys()))


@dataclass
class LoadReport:
    """What loading a subset of disk tensors set, and what did not fit."""

    loaded: set[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    failed: dict[str, str]  # module key -> why its conversion failed (e.g. experts of unequal shapes)


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], keys: KeyMap, device: torch.device | str,
              expected: set[str]) -> LoadReport:
    """Load disk tensors (by disk key) into `model`, converted as `from_pretrained` converts them.

    Each parameter takes the dtype the (meta) model declares for it. `expected` are the module
    keys these tensors should fill; the report lists which were set and any shape mismatch.
    """
    mapping = [_filled_in_place(rule) for rule in keys.mapping]
    originals = {id(rewritten): rule for rewritten, rule in zip(mapping, keys.mapping)}
    config = LoadStateDictConfig(device_map={"": str(device)}, dtype=None, weight_mapping=mapping)
    # transformers prints a progress bar per call ("Loading weights"); one per layer is noise here
    previous = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(model, dict(tensors), config)
    finally:
        if previous:
            hf_logging.enable_progress_bar()
    # the model remembers the rules it was loaded with (saving reverses them): the stock ones, not the rewrites
    used = getattr(model, "_weight_conversions", None)
    if used is not None:
        model._weight_conversions = [originals.get(id(rule), rule) for rule in used]
    missing = set(info.missing_keys) & expected
    mismatched = [(name, tuple(got), tuple(want)) for name, got, want in info.mismatched_keys]
    # transformers records a failed conversion as a traceback followed by "Error..." and skips the parameter
    failed = {name: text.split("\nError")[0].strip().splitlines()[-1] for name, text in info.conversion_errors.items()}
    return LoadReport(loaded=expected - missing, mismatched=mismatched, failed=failed)
