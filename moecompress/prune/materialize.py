"""Turn a `PrunePlan` into a checkpoint folder: drop weights, patch the config, write, document.

Two output forms, chosen by the plan:

* uniform plans (same expert count in every MoE layer; same width in every expert): the
  adapter rebuilds the model from a patched config (expert count, and width for uniform
  neuron plans), router rows, router bias and correction biases sliced together; the folder
  loads in plain `AutoModelForCausalLM.from_pretrained`;
* non-uniform plans (global allocation, per-expert neuron widths): in-place per-layer surgery
  and moecompress's own layout format (`moecompress.models.layout`), which only
  `moecompress.load` opens. This is said in the README and returned as `notice` for the CLI
  to print.

Either way the folder holds sharded safetensors, config.json, the tokenizer,
`moecompress_manifest.json` and a short README; it is written to a temporary sibling and
renamed into place when complete (`moecompress.io.output.atomic_output_dir`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.errors import MoecompressError
from moecompress.models.adapters.base import MoEAdapter
from moecompress.models.load import CheckpointInfo
from moecompress.prune.plan import PrunePlan

TRANSFORMERS_LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
MOECOMPRESS_LOADER = "moecompress.load"
LAYOUT_NOTICE = ("this plan keeps a different number of experts per layer or a different width per expert, which a "
                 "stock transformers config cannot express: the checkpoint is written in moecompress's layout format "
                 "and loads only with moecompress.load(path)")


NEURONS_FILE = "prune_neurons.safetensors"


@dataclass
class Written:
    """Where and how a pruned checkpoint was written."""

    path: Path
    format: str  # "transformers" or "moecompress-layout"
    loads_with: str
    notice: str | None = None


def set_top_k(config: Any, adapter: MoEAdapter, top_k: int) -> None:
    """Write a new experts-per-token value into `config` (a per-layer list keeps its length)."""
    current = getattr(config, adapter.top_k_key)
    setattr(config, adapter.top_k_key, [top_k] * len(current) if isinstance(current, (list, tuple)) else top_k)


def _settings(plan: PrunePlan) -> dict[str, Any]:
    """The `moecompress` config entry for the output (dynamic skipping thresholds)."""
    from moecompress.prune.dynamic_skip import skip_settings

    if not plan.dynamic_skip:
        return {}
    return {"dynamic_skip": skip_settings(plan.dynamic_skip, plan.skip_fraction or 0.0)}


def readme_for(plan: PrunePlan, source: Path, written_format: str) -> str:
    """The short README written into a pruned checkpoint."""
    counts = plan.kept_counts()
    if plan.granularity == "neuron":
        fraction = plan.neuron_fraction_kept() or 1.0
        what = (f"{100 * (1 - fraction):.1f}% of routed-expert neurons removed ({plan.allocation} allocation; all "
                f"{plan.num_experts} experts per layer kept)")
    elif plan.merge != "none":
        what = (f"{plan.num_experts} routed experts merged into {next(iter(counts.values()))} in every MoE layer "
                f"({plan.merge} merging: frequency-weighted averages of each group's weights, neurons aligned to the "
                "representative's, whose router row the merged expert keeps)")
    elif len(set(counts.values())) == 1:
        what = f"{next(iter(counts.values()))} of {plan.num_experts} routed experts kept in every MoE layer"
    else:
        what = (f"{min(counts.values())}-{max(counts.values())} of {plan.num_experts} routed experts kept per MoE layer "
                f"({plan.allocation} allocation)")
    lines = [
        "# Pruned with moecompress",
        "",
        f"Source: `{source}`. Method: `{plan.method}`: {what}"
        f"{f', calibrated on domain `{plan.domain}`' if plan.domain else ''}.",
        "",
    ]
    if written_format == "transformers":
        lines.append("The config's expert count (and width) is patched and router rows (and correction biases) are "
                     "sliced, so this folder loads with plain `transformers.AutoModelForCausalLM.from_pretrained` "
                     "(no remote code), and with `moecompress.load`.")
    else:
        lines += [
            "**This folder loads only with `moecompress.load(path)`.** A stock transformers config holds one expert "
            "count and one expert width; this model keeps a different number of experts per layer and/or a different "
            "width per expert. `moecompress_layout.json` lists the per-layer counts and per-expert widths; the "
            "weights (`moecompress-model-*.safetensors`) use the in-memory tensor names, and per-expert widths are "
            "stored packed (no padding on disk). In memory each layer's experts are zero-padded to that layer's "
            "largest width (exact: padded neurons contribute zero), so memory is that of the padded widths.",
        ]
    if plan.dynamic_skip:
        lines += ["", f"Dynamic expert skipping (NAEE): `config.json` -> `moecompress.dynamic_skip` holds a threshold "
                  f"beta per layer; `moecompress.load` skips the second expert when w2 < beta * w1 "
                  f"({100 * (plan.skip_fraction or 0):.1f}% of expert calls skipped on the calibration data). Plain "
                  "transformers ignores it."]
    if plan.merged:
        lines += ["", "`prune_plan.json` -> `merged` lists, per layer, the input experts merged into each output expert "
                  "(aligned with `keep`: output expert i keeps the router row of input expert keep[i]), and "
                  "`merge_weights` their weights."]
    if plan.new_top_k is not None:
        lines += ["", f"The router's top-k was changed from {plan.top_k} to {plan.new_top_k}."]
    lines += ["", "`moecompress_manifest.json` records the method, parameters, kept experts per layer, the calibration "
              "statistics digest, the seed and library versions."]
    return "\n".join(lines) + "\n"


def save_neuron_masks(plan: PrunePlan, path: Path) -> None:
    """Record which neurons every kept expert keeps: one bool (E, I) mask per MoE layer, "layer.{L}"."""
    from safetensors.torch import save_file

    masks = {}
    for layer, per_expert in sorted(plan.neurons.items()):
        mask = torch.zeros(len(per_expert), plan.intermediate_size or 0, dtype=torch.bool)
        for e, ids in enumerate(per_expert):
            mask[e, ids] = True
        masks[f"layer.{layer}"] = mask
    save_file(masks, str(path), metadata={"format": "moecompress-neuron-masks"})


def merge_in_place(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> None:
    """Write each merged expert's weights (`PrunePlan.merges`) into its kept slot of `model`, in place.

    Through the adapter's canonical views (`expert_weights`), so every layout (fused,
    interleaved, DBRX's flattened experts) is served: each member's neurons are first aligned
    to the representative's (`neuron_alignment.align_neurons` on gate, up and down), then the kept
    expert's gate, up, down and biases become sum_j w_j P_j W_j (`neuron_alignment.aligned_sum`, cast
    back). All merged values of a layer are computed before any is written; the later drop
    keeps the written slots.
    """
    from moecompress.models.neuron_alignment import align_neurons, aligned_sum, neuron_features

    matrices = ("gate", "up", "down")
    axes = {"gate": 0, "up": 0, "down": 1, "gate_bias": 0, "up_bias": 0, "down_bias": None}
    for ref in adapter.moe_layers(model):
        merges = plan.merges(ref.index)
        if merges is None:
            continue
        canonical = [adapter.expert_weights(ref, e) for e in range(ref.num_experts)]

        def features(e: int) -> torch.Tensor:
            present = [name for name in matrices if getattr(canonical[e], name) is not None]
            return neuron_features([getattr(canonical[e], name) for name in present], [axes[n] for n in present])

        writes = []
        with torch.no_grad():
            for members, slot in zip(merges, plan.keep[ref.index]):
                if members == [(slot, 1.0)]:
                    continue
                base = features(slot)
                perms = {j: None if j == slot else align_neurons(base, features(j)) for j, _ in members}
                for name, axis in axes.items():
                    target = getattr(canonical[slot], name)
                    if target is not None:
                        parts = [(getattr(canonical[j], name), weight, perms[j]) for j, weight in members]
                        writes.append((target, aligned_sum(parts, axis).to(target.dtype)))
            for target, value in writes:
                target.copy_(value)


def materialize(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan) -> tuple[nn.Module, Any, Any]:
    """(pruned model, layout or None, config to write) for `plan`; non-uniform plans and merges modify `model` in place."""
    from moecompress.models.layout import drop_to_layout, layout_config

    settings = _settings(plan)
    if plan.merged:
        merge_in_place(model, adapter, plan)
    layers = [ref.index for ref in adapter.moe_layers(model)]
    if plan.granularity == "neuron" and plan.allocation == "uniform":
        neurons = {layer: torch.stack(list(plan.neurons[layer])) for layer in layers}
        pruned = adapter.drop(model, keep_neurons=neurons)
        config, layout = pruned.config, None
    elif plan.granularity == "expert" and plan.uniform:
        everything = all(len(plan.keep[layer]) == plan.num_experts for layer in layers)
        pruned = model if everything else adapter.drop(model, keep_experts=plan.keep)
        config, layout = pruned.config, None
    else:
        keep_experts = plan.keep if plan.granularity == "expert" else None
        keep_neurons = plan.neurons if plan.granularity == "neuron" else None
        layout = drop_to_layout(model, adapter, keep_experts=keep_experts, keep_neurons=keep_neurons)
        config = layout_config(model.config, adapter, layout)
        pruned = model
    if plan.new_top_k is not None:
        set_top_k(config, adapter, plan.new_top_k)
    if settings:
        current = dict(getattr(config, "moecompress", None) or {})
        current.update(settings)
        config.moecompress = current
    return pruned, layout, config


def pruned_config(config: Any, adapter: MoEAdapter, plan: PrunePlan) -> Any:
    """The config of a uniform plan's output: expert count (or expert width), top-k and moecompress settings patched."""
    counts = set(plan.kept_counts().values())
    if not plan.uniform or len(counts) != 1:
        raise MoecompressError("internal error: pruned_config needs a uniform plan")
    count = counts.pop()
    if plan.granularity == "neuron":
        adapter.check_width_patchable(config)
        (width,) = {w for per in plan.widths.values() for w in per}
        new = adapter.patched_config(config, intermediate_size=width)
    else:
        new = config if count == plan.num_experts else adapter.patched_config(config, num_experts=count)
    new = copy.deepcopy(new)
    if plan.new_top_k is not None:
        set_top_k(new, adapter, plan.new_top_k)
    settings = _settings(plan)
    if settings:
        current = dict(getattr(new, "moecompress", None) or {})
        current.update(settings)
        new.moecompress = current
    return new


def write_pruned(model: nn.Module, adapter: MoEAdapter, plan: PrunePlan, tokenizer: Any, output: str | Path,
                 manifest: dict[str, Any], source: Path, force: bool = False) -> Written:
    """Materialise `plan` on `model` and write the folder atomically to `output`."""
    from moecompress.io.checkpoint import DEFAULT_SHARD_SIZE, cast_model
    from moecompress.io.output import atomic_output_dir
    from moecompress.io.stored_formats import linear_weight_names, restore_stored_format
    from moecompress.models.layout import save_layout_checkpoint
    from moecompress.models.load import inspect_checkpoint
    from moecompress.sizes import checkpoint_dtype

    pruned, layout, config = materialize(model, adapter, plan)
    try:
        info = inspect_checkpoint(source)
    except MoecompressError:  # not a checkpoint folder (an in-memory model): keep the working dtype
        info = None
    saved_dtype = checkpoint_dtype(info) if info is not None else None
    if saved_dtype is not None:
        cast_model(pruned, saved_dtype)  # write in the input's dtype, not the working dtype
    form = "transformers" if layout is None else "moecompress-layout"
    manifest = dict(manifest)
    if layout is not None:
        manifest["layout"] = layout.model_dump()
    stored = _stored_tensors(info)
    with atomic_output_dir(output, force=force) as tmp:
        if layout is None:
            pruned.config = config
            pruned.save_pretrained(tmp, max_shard_size=DEFAULT_SHARD_SIZE)
            if stored is not None:  # the input's FP8 / MXFP4 format, changed matrices re-quantised
                restore_stored_format(tmp, stored, linear_weight_names(pruned))
                manifest["stored_format"] = stored.format.method
        else:
            save_layout_checkpoint(pruned, adapter, layout, tmp, config, max_shard_size=DEFAULT_SHARD_SIZE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_records(tmp, plan, manifest, source, form)
        if stored is not None:
            _note_format(tmp, f"The weights are stored like the input's, in {stored.format.describe()}: matrices "
                              "this pruning left unchanged are copied byte for byte, changed ones (fewer neurons, "
                              "renumbered experts) are re-quantised with the input's block size.")
    return _written(output, form)


def _note_format(folder: Path, sentence: str) -> None:
    """Add a paragraph on the stored weight format to the folder's README."""
    readme = folder / "README.md"
    readme.write_text(readme.read_text().rstrip("\n") + "\n\n" + sentence + "\n")


def _stored_tensors(info: Any) -> Any:
    """The input's tensors when it is stored in FP8 blocks or MXFP4 (None for float checkpoints or no folder)."""
    from moecompress.io.stored_formats import StoredTensors, open_tensors

    if info is None:
        return None
    files = open_tensors(info.weight_files, info.config)
    return files if isinstance(files, StoredTensors) else None


def write_pruned_by_copy(info: CheckpointInfo, plan: PrunePlan, output: str | Path, manifest: dict[str, Any],
                         force: bool = False, progress: bool = True) -> Written:
    """Write a uniform expert or neuron plan by copying the kept tensors from the input's shards (no model built).

    The tensors are read as stored (FP8 blocks and MXFP4 experts stay in their format).
    Raises `ExpertCopyUnsupported` before writing anything when the layout needs the model.
    """
    from moecompress.io.output import atomic_output_dir
    from moecompress.io.expert_copy import check_copy, prune_by_copy
    from moecompress.io.stored_formats import open_tensors

    adapter, config, source = info.adapter, info.config, Path(info.path)
    files = open_tensors(info.weight_files, config)
    new_config = pruned_config(config, adapter, plan)
    merges = {layer: plan.merges(layer) for layer in plan.merged}
    neurons = plan.neurons if plan.granularity == "neuron" else None
    outputs = check_copy(files, adapter, config, new_config, plan.keep, merges, neurons)
    with atomic_output_dir(output, force=force) as tmp:
        prune_by_copy(source, files, outputs, new_config, tmp, progress=progress)
        stored = files.store is not files
        write_records(tmp, plan, dict(manifest, written_by="tensor copy", stored_format=getattr(
            getattr(files, "format", None), "method", "float")), source, "transformers")
        if stored:
            _note_format(tmp, f"The weights are stored like the input's, in {files.format.describe()}: the kept "
                              "experts' tensors and their scales are copied byte for byte.")
    return _written(output, "transformers")


def write_records(folder: Path, plan: PrunePlan, manifest: dict[str, Any], source: Path, form: str) -> None:
    """The manifest, README, plan and neuron masks that every pruned folder carries."""
    from moecompress.io.manifest import write_manifest

    loads_with = TRANSFORMERS_LOADER if form == "transformers" else MOECOMPRESS_LOADER
    write_manifest(folder, dict(manifest, format=form, loads_with=loads_with))
    (folder / "README.md").write_text(readme_for(plan, source, form))
    (folder / "prune_plan.json").write_text(plan.model_dump_json(indent=2, exclude={"scores"}) + "\n")
    if plan.neurons:
        save_neuron_masks(plan, folder / NEURONS_FILE)


def _written(output: str | Path, form: str) -> Written:
    if form == "transformers":
        return Written(Path(output), form, TRANSFORMERS_LOADER, None)
    return Written(Path(output), form, MOECOMPRESS_LOADER, LAYOUT_NOTICE)
