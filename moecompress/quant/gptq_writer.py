"""GPTQ-format checkpoints with per-module bits, written one decoder layer at a time.

Layout (what GPTQModel 7.6 writes and loads for MoE models, checked against its own output):

* every quantised map `M` becomes `M.qweight`, `M.qzeros`, `M.scales`, `M.g_idx` (see
  `moecompress.quant.pack`) plus `M.bias` in float16; names are the in-memory (transformers
  5) module paths;
* routed experts are always written unfused, one linear per projection:
  `{experts_path}.{e}.gate_proj|up_proj|down_proj` (quantised, or `.weight` in the original
  dtype when the plan leaves an expert unquantised), whatever the in-memory layout (fused
  3-D, transposed or interleaved) and whatever the architecture's usual on-disk names;
* everything else keeps its in-memory name and the original dtype.

`config.json` gets a `quantization_config` whose top level is the most common spec and whose
`dynamic` map (GPTQModel's per-module overrides) gives every other width, group size or
symmetry, and `-:` skips for maps kept unquantised. Symmetric checkpoints use the GPTQ v1
zero-point convention (`checkpoint_format: "gptq"`); any asymmetric map switches the whole
checkpoint to v2 (`"gptq_v2"`), which stores zero points as they are. `quant_plan.json`
holds the full plan for moecompress's own loader.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress import __version__ as moecompress_version
from moecompress.errors import MoecompressError
from moecompress.quant.fake_quant import non_layer_state
from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.quant.apply import LayerResult
from moecompress.quant.layout import interleaved_gate_up, tensor_halves, to_checkpoint_halves
from moecompress.quant.pack import to_gptq_tensors
from moecompress.quant.plan import EXPERT_PROJECTIONS, PLAN_FILE, QuantPlan
from moecompress.io.safetensors_stream import ShardWriter
from moecompress.quant.solve import Solved
from moecompress.quant.spec import GPTQ_FORMAT_BITS


def _halves(gate: Any, up: Any) -> tuple[Any, Any]:
    """Canonical gate/up (solved or plain) -> the stored halves of an interleaved fused layout."""
    if isinstance(gate, Solved):
        first, second = to_checkpoint_halves(gate.weight, up.weight)
        return Solved(first, gate.method, gate.damp), Solved(second, up.method, up.damp)
    return tensor_halves(gate, up)


def check_gptq_plan(plan: QuantPlan) -> None:
    """Raise when the plan holds a width the GPTQ format cannot store."""
    bad = sorted({e.spec.bits for e in plan.entries.values() if e.spec is not None} - set(GPTQ_FORMAT_BITS))
    if bad:
        raise MoecompressError(f"the GPTQ format stores {', '.join(map(str, GPTQ_FORMAT_BITS))} bits, not "
                               f"{', '.join(map(str, bad))}; drop those candidate widths or use --format fake")
    if plan.base_spec() is None:
        raise MoecompressError("nothing is quantised in this plan; a GPTQ checkpoint needs at least one quantised map")


class GPTQWriter:
    """Writes the GPTQ checkpoint while `quantize_model` walks the layers."""

    def __init__(self, folder: str | Path, model: nn.Module, adapter: MoEAdapter, plan: QuantPlan,
                 dtype: torch.dtype, max_shard_bytes: int = 2 * 10**9) -> None:
        check_gptq_plan(plan)
        self.folder = Path(folder)
        self.model = model
        self.adapter = adapter
        self.plan = plan
        self.dtype = dtype
        self.symmetric = all(e.spec.sym for e in plan.entries.values() if e.spec is not None)
        self.zero_offset = 1 if self.symmetric else 0
        self.shards = ShardWriter(self.folder, max_shard_bytes)
        self.moe = {ref.index: ref for ref in adapter.moe_layers(model)}
        self.params_by_role: Counter[str] = Counter()
        self.bytes_by_role: Counter[str] = Counter()

    # ---------------------------------------------------------------- tensors
    def _packed(self, name: str, solved: Solved, bias: torch.Tensor | None, role: str) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{key}": value for key, value in to_gptq_tensors(solved.weight, self.zero_offset).items()}
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(torch.float16)
        out_features, in_features = solved.weight.shape
        self.params_by_role[role] += out_features * in_features
        self.bytes_by_role[role] += sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors

    def _plain(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.to(self.dtype) if t.is_floating_point() else t for name, t in state.items()}

    def _experts(self, moe: MoELayerRef, result: LayerResult) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        interleaved = interleaved_gate_up(moe)
        for e in range(moe.num_experts):
            key = f"{moe.experts_path}.{e}"
            canonical = self.adapter.expert_weights(moe, e)
            solved = result.experts.get(key, {})
            weights: dict[str, Any] = {"gate_proj": solved.get("gate_proj", canonical.gate),
                                       "up_proj": solved.get("up_proj", canonical.up),
                                       "down_proj": solved.get("down_proj", canonical.down)}
            biases = {"gate_proj": canonical.gate_bias, "up_proj": canonical.up_bias, "down_proj": canonical.down_bias}
            if interleaved:
                weights["gate_proj"], weights["up_proj"] = _halves(weights["gate_proj"], weights["up_proj"])
                if canonical.gate_bias is not None:
                    biases["gate_proj"], biases["up_proj"] = tensor_halves(canonical.gate_bias, canonical.up_bias)
            for proj in EXPERT_PROJECTIONS:
                weight, bias = weights[proj], biases[proj]
                if weight is None:
                    continue
                name = f"{key}.{proj}"
                if isinstance(weight, Solved):
                    tensors.update(self._packed(name, weight, bias, "routed_experts"))
                else:
                    plain = {f"{name}.weight": weight.detach().clone()}
                    if bias is not None:
                        plain[f"{name}.bias"] = bias.detach().clone()
                    tensors.update(self._plain(plain))
        return tensors

    def on_layer(self, index: int | None, result: LayerResult) -> None:
        """Callback for `quantize_model`: write decoder layer `index` (None: everything else)."""
        if index is None:
            state = non_layer_state(self.model, self.adapter)
        else:
            layer = self.adapter.decoder_layers(self.model)[index]
            state = layer.state_dict(prefix=f"{self.adapter.layers_path}.{index}.")
        out: dict[str, torch.Tensor] = {}
        for name, solved in result.linears.items():
            module = self.model.get_submodule(name)
            state.pop(f"{name}.weight", None)
            state.pop(f"{name}.bias", None)
            role = self.plan.entries[name].role
            out.update(self._packed(name, solved, module.bias, role))
        moe = self.moe.get(index) if index is not None else None
        if moe is not None:
            for param in self.adapter.expert_weight_names(moe):  # replaced by each expert's packed projections
                state.pop(f"{moe.experts_path}.{param}", None)
            out.update(self._experts(moe, result))
        out.update(self._plain(state))
        self.shards.add_all(out)

    def state(self) -> dict[str, Any]:
        """What `restore` needs to continue writing in a resumed run (taken between layers)."""
        return {"shards": self.shards.state(), "params_by_role": dict(self.params_by_role),
                "bytes_by_role": dict(self.bytes_by_role)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue as the writer whose `state()` this is."""
        self.shards.restore(state["shards"])
        self.params_by_role = Counter(state["params_by_role"])
        self.bytes_by_role = Counter(state["bytes_by_role"])

    # ---------------------------------------------------------------- config
    def quantization_config(self) -> dict[str, Any]:
        """The `quantization_config` of config.json (GPTQModel's keys)."""
        base = self.plan.base_spec()
        assert base is not None
        head = next((e for e in self.plan.entries.values() if e.role == "lm_head"), None)
        checkpoint_format = "gptq" if self.symmetric else "gptq_v2"
        return {
            "bits": base.bits,
            "group_size": base.group_size,
            "desc_act": base.act_order,
            "sym": base.sym,
            "lm_head": bool(head is not None and head.spec is not None),
            "quant_method": "gptq",
            "method": "gptq",
            "format": checkpoint_format,
            "checkpoint_format": checkpoint_format,
            "pack_dtype": "int32",
            "damp_percent": base.damp,
            "true_sequential": True,
            "dynamic": self.plan.gptqmodel_dynamic(base),
            "meta": {"quantizer": [f"moecompress:{moecompress_version}"]},
        }

    def finish(self) -> list[Path]:
        """Close the shards; write config.json (with quantization_config), quantize_config.json, the plan."""
        files = self.shards.finish()
        config = self.model.config
        qconfig = self.quantization_config()
        saved = (getattr(config, "dtype", None), getattr(config, "quantization_config", None))
        config.dtype = self.dtype
        config.quantization_config = qconfig
        try:
            config.save_pretrained(self.folder)
        finally:
            config.dtype = saved[0]
            if saved[1] is None:
                del config.quantization_config
            else:
                config.quantization_config = saved[1]
        (self.folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        (self.folder / PLAN_FILE).write_text(self.plan.model_dump_json(indent=2) + "\n")
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.folder)
        return files

    def effective_bits(self) -> dict[str, float]:
        """Bits per weight on disk of each quantised role (codes, scales, zeros, g_idx and biases)."""
        return {role: 8 * self.bytes_by_role[role] / self.params_by_role[role] for role in sorted(self.params_by_role)}
