"""`moecompress inspect`: what a checkpoint is and where its bytes go, without loading weights.

The checkpoint's config and safetensors headers are read (`inspect_checkpoint`); the module
tree is built on the meta device, so inspecting a 100 GB model takes seconds and no memory.
"""

from __future__ import annotations

import inspect as pyinspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from moecompress.cli.app import app
from moecompress.cli.options import JsonOption
from moecompress.errors import MoecompressError

if TYPE_CHECKING:  # the annotation only: importing adapters pulls in torch, which slows every command's start
    from moecompress.models.adapters.base import MoEAdapter

ROLE_LABELS: dict[str, str] = {
    "attention": "attention",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "dense_mlp": "dense MLPs",
    "routers": "routers",
    "embeddings": "embeddings + head",
    "norms_other": "norms / other",
}


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything `inspect` shows, as a JSON-ready dict (config, MoE layout, sizes by role)."""
    from moecompress.models.load import inspect_checkpoint, text_config
    from moecompress.sizes import checkpoint_dtype, size_report, skeleton_model

    info = inspect_checkpoint(path)
    adapter = info.adapter
    config = text_config(info.config)
    dtype = checkpoint_dtype(info)
    skeleton = skeleton_model(info.config, dtype)
    moe_layers = adapter.moe_layers(skeleton)
    num_layers = len(adapter.decoder_layers(skeleton))
    moe_indices = [ref.index for ref in moe_layers]
    layers = []
    for ref in moe_layers:
        shared_params = sum(p.numel() for module in ref.shared for p in module.parameters())
        layers.append(
            {
                "index": ref.index,
                "path": ref.path,
                "experts": ref.num_experts,
                "top_k": ref.top_k,
                "expert_intermediate_size": adapter.expert_weights(ref, 0).intermediate_size,
                "shared_modules": len(ref.shared),
                "shared_params": shared_params,
            }
        )
    groups = adapter.groups(config)
    sizes = size_report(skeleton, adapter, dtype=dtype)
    return {
        "path": str(info.path),
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(info.config, "architectures", None) or []),
        "adapter": type(adapter).__name__,
        "supported": True,
        "description": adapter_description(adapter),
        "routing": getattr(adapter, "routing", None),
        "groups": None if groups is None else {"n_group": groups[0], "topk_group": groups[1]},
        "num_layers": num_layers,
        "moe_layer_indices": moe_indices,
        "dense_layer_indices": [i for i in range(num_layers) if i not in set(moe_indices)],
        "num_experts": _uniform([layer["experts"] for layer in layers]),
        "top_k": adapter.top_k(config),
        "expert_intermediate_size": _uniform([layer["expert_intermediate_size"] for layer in layers]),
        "shared_modules_per_layer": _uniform([layer["shared_modules"] for layer in layers]),
        "shared_params_per_layer": _uniform([layer["shared_params"] for layer in layers]),
        "moe_layers": layers,
        "dtype": sizes.dtype,
        "sizes": sizes.to_dict(),
        "bytes_on_disk": info.bytes_on_disk,
        "stored_format": {"method": info.stored_format.method, "description": info.stored_format.describe(),
                          "quantization_config": info.stored_format.config or None},
        "stored_bytes": stored_bytes_by_role(info, skeleton),
        "writes": what_commands_write(info.stored_format),
        "weight_files": [f.name for f in info.weight_files],
        "num_tensors_on_disk": len(info.tensor_names),
    }


def stored_bytes_by_role(info: Any, skeleton: Any) -> dict[str, int]:
    """Bytes on disk per role, in the format the checkpoint stores (FP8 weights with their scales, ...)."""
    from moecompress.io.stored_formats import open_tensors, stored_bytes
    from moecompress.models.weight_conversion import key_map
    from moecompress.sizes import ROLES, tensor_roles

    files = open_tensors(info.weight_files, info.config)
    roles = tensor_roles(skeleton, info.adapter)
    keys = key_map(skeleton)
    totals = dict.fromkeys(ROLES, 0)
    for name in files.names():
        module_key = keys.module_key(name)
        totals[roles.get(module_key or "", "norms_other")] += stored_bytes(files, name)
    return totals


def what_commands_write(fmt: Any) -> dict[str, str]:
    """What each command writes from a checkpoint in this stored format (shown by `inspect`)."""
    if not fmt.quantized:
        same = "the input's dtype"
        return {"prune": same, "condense": same, "quantize": "GPTQ (moecompress.load, GPTQModel)",
                "compress": "GPTQ (moecompress.load, GPTQModel)"}
    name = fmt.describe()
    return {
        "prune": f"{name}: dropped experts' tensors left out, kept ones copied byte for byte with their scales; "
                 "neuron pruning re-quantises the changed matrices in the same format",
        "condense": f"{name}: changed matrices re-quantised in the same format",
        "quantize": "GPTQ from the dequantised weights (moecompress.load, GPTQModel)",
        "compress": "GPTQ from the dequantised weights (moecompress.load, GPTQModel)",
    }


def adapter_description(adapter: MoEAdapter) -> str:
    """One line describing the adapter's routing: its class docstring, else its module's."""
    doc = type(adapter).__doc__ or pyinspect.getmodule(type(adapter)).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _uniform(values: list[Any]) -> Any:
    """The common value of a list, or the list itself when values differ (None when empty)."""
    if not values:
        return None
    return values[0] if all(v == values[0] for v in values) else values


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (or '-' when empty)."""
    if not indices:
        return "-"
    parts = []
    start = prev = indices[0]
    for index in indices[1:] + [None]:  # type: ignore[list-item]
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ", ".join(parts)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from moecompress.sizes import format_bytes, format_count

    console = Console()
    overview = Table(title=f"{summary['path']}", show_header=False, box=None, pad_edge=False)
    overview.add_column(style="bold")
    overview.add_column()
    groups = summary["groups"]
    shared_params = summary["shared_params_per_layer"]
    rows = [
        ("model_type", summary["model_type"]),
        ("adapter", f"{summary['adapter']} (supported)"),
        ("routing", summary["routing"] or summary["description"] or "-"),
        ("expert groups", "-" if groups is None else f"{groups['n_group']} groups, top {groups['topk_group']} kept"),
        ("decoder layers", str(summary["num_layers"])),
        ("MoE layers", f"{_ranges(summary['moe_layer_indices'])} ({len(summary['moe_layer_indices'])})"),
        ("dense layers", f"{_ranges(summary['dense_layer_indices'])} ({len(summary['dense_layer_indices'])})"),
        ("experts per layer", str(summary["num_experts"])),
        ("experts per token", str(summary["top_k"])),
        ("expert width", str(summary["expert_intermediate_size"])),
        (
            "shared experts",
            "none"
            if not summary["shared_modules_per_layer"]
            else f"{summary['shared_modules_per_layer']} module(s)/layer, "
            f"{format_count(shared_params) if isinstance(shared_params, int) else shared_params} params/layer",
        ),
        ("dtype", str(summary["dtype"])),
        ("stored as", summary["stored_format"]["description"]),
        ("on disk", f"{format_bytes(summary['bytes_on_disk'])} in {len(summary['weight_files'])} file(s)"),
    ]
    for key, value in rows:
        overview.add_row(key, value)
    console.print(overview)

    sizes = summary["sizes"]
    table = Table(title="Parameters by role")
    table.add_column("role")
    table.add_column("params", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    quantized = summary["stored_format"]["method"] != "float"
    if quantized:
        table.add_column("on disk", justify="right")
    stored = summary["stored_bytes"]
    total = max(sizes["total_params"], 1)
    for role, entry in sizes["roles"].items():
        if entry["params"] == 0:
            continue
        cells = [ROLE_LABELS.get(role, role), format_count(entry["params"]), format_bytes(entry["bytes"]),
                 f"{100 * entry['params'] / total:.1f}%"]
        table.add_row(*cells, *([format_bytes(stored[role])] if quantized else []))
    table.add_row("total", format_count(sizes["total_params"]), format_bytes(sizes["total_bytes"]), "100%",
                  *([format_bytes(sum(stored.values()))] if quantized else []), style="bold")
    console.print(table)
    if quantized:
        writes = Table(title=f"What each command writes from {summary['stored_format']['description']}")
        writes.add_column("command")
        writes.add_column("writes")
        for command, what in summary["writes"].items():
            writes.add_row(command, what)
        console.print(writes)


def _print_gptq(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from moecompress.sizes import format_bytes

    console = Console()
    overview = Table(title=f"{summary['path']} (GPTQ, written by moecompress)", show_header=False, box=None,
                     pad_edge=False)
    overview.add_column(style="bold")
    overview.add_column()
    histogram = ", ".join(f"{count} at {bits} bits" for bits, count in summary["expert_bits_histogram"].items())
    others = ", ".join(f"{count} at {bits} bits" for bits, count in summary["other_linears_bits_histogram"].items())
    average = summary["average_expert_bits"]
    before = summary["bytes_before"]
    rows = [
        ("method", str(summary["method"] or "-")),
        ("source", str(summary["source"] or "-")),
        ("routed experts", f"{average:.3f} average bits ({histogram})" if average is not None else "none quantised"),
        ("other linears", others or "none quantised"),
        ("on disk", format_bytes(summary["bytes_on_disk"])
         + (f" (from {format_bytes(before)})" if before else "")),
    ]
    for key, value in rows:
        overview.add_row(key, value)
    console.print(overview)
    loaders = Table(title="Opens with")
    loaders.add_column("loader")
    loaders.add_column("call")
    loaders.add_column("what it does")
    for entry in summary["opens_with"]:
        loaders.add_row(entry["loader"], entry["call"], entry["does"])
    for entry in summary["does_not_open_with"]:
        loaders.add_row(entry["loader"], "-", f"does not open it: {entry['why']}")
    console.print(loaders)


def _print_architectures(as_json: bool) -> None:
    from moecompress.models.adapters import supported_model_types, unsupported_model_types

    supported = supported_model_types()
    unsupported = unsupported_model_types()
    if as_json:
        typer.echo(json.dumps({"supported": supported, "unsupported": unsupported}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Architectures (transformers model_type)")
    table.add_column("model_type")
    table.add_column("status")
    for name in supported:
        table.add_row(name, "supported")
    for name, reason in unsupported.items():
        table.add_row(name, f"not supported: {reason}")
    Console().print(table)


@app.command("inspect")
def inspect_command(
    model: Annotated[
        Path | None,
        typer.Argument(help="Local Hugging Face checkpoint folder (config.json + safetensors).", show_default=False),
    ] = None,
    json_output: JsonOption = False,
    list_architectures: Annotated[
        bool, typer.Option("--list-architectures", help="List supported and unsupported model_types and exit.")
    ] = False,
) -> None:
    """Show a checkpoint's MoE layout and where its parameters go, without loading weights.

    Reads config.json and the safetensors headers only: model type, MoE and dense layers,
    experts per layer and per token, shared experts, routing, and parameters and bytes by
    role (attention, routed experts, shared experts, dense MLPs, routers, embeddings, norms).
    A GPTQ folder written by `quantize` shows its plan (bits per expert), its size and which
    loaders open it.

    Examples:

    * `moecompress inspect ./Qwen3-30B-A3B`
    * `moecompress inspect ./my-moe --json`
    * `moecompress inspect --list-architectures`
    """
    if list_architectures:
        _print_architectures(json_output)
        return
    if model is None:
        raise MoecompressError("pass a checkpoint folder (moecompress inspect MODEL) or --list-architectures")
    from moecompress.loader import checkpoint_kind

    if checkpoint_kind(model) == "gptq":  # quantize output: its plan, sizes and what opens it
        from moecompress.quant.describe import describe_gptq_folder

        gptq = describe_gptq_folder(model)
        if json_output:
            typer.echo(json.dumps(gptq, indent=2))
        else:
            _print_gptq(gptq)
        return
    summary = describe_checkpoint(model)
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
