"""Which maps of a model quantisation touches, found from the adapter's roles (never from names).

* linear targets: every `nn.Linear` inside a decoder layer whose weight's role (see
  `moecompress.sizes.tensor_roles`) is attention, shared_experts or dense_mlp, plus the output
  head (role lm_head) when it is not tied to the input embedding. Routers and shared-expert
  gates have role "routers" and are never quantised.
* routed experts: each MoE layer's experts as canonical (gate, up, down) views, so fused 3-D
  parameters (any layout) are read and written in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moecompress.models.adapters.base import MoEAdapter, MoELayerRef
from moecompress.sizes import tensor_roles

QUANTIZABLE_ROLES = ("attention", "shared_experts", "dense_mlp")
# layer stages, quantised in this order (the MLP slot sees inputs from the quantised attention)
STAGE_OF_ROLE = {"attention": 0, "shared_experts": 1, "dense_mlp": 1, "routed_experts": 1}


@dataclass
class LinearTarget:
    """One quantisable `nn.Linear`."""

    name: str  # module path in the loaded model
    module: nn.Linear
    role: str
    layer: int | None  # decoder layer index; None for the output head

    @property
    def params(self) -> int:
        return self.module.in_features * self.module.out_features


@dataclass
class ModelTargets:
    """Quantisable linear maps per decoder layer, the MoE layers and the output head."""

    linears: dict[int, list[LinearTarget]]  # decoder layer -> linear targets
    moe: dict[int, MoELayerRef]  # decoder layer -> MoE block
    head: LinearTarget | None  # the output head (None when tied to the input embedding)
    num_layers: int


def find_targets(model: nn.Module, adapter: MoEAdapter) -> ModelTargets:
    """Discover every quantisable map of `model` (works on meta / streamed models too)."""
    roles = tensor_roles(model, adapter)
    layers = adapter.decoder_layers(model)
    linears: dict[int, list[LinearTarget]] = {i: [] for i in range(len(layers))}
    for index, layer in enumerate(layers):
        prefix = f"{adapter.layers_path}.{index}"
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or not name:
                continue
            full = f"{prefix}.{name}"
            role = roles.get(full + ".weight")
            if role in QUANTIZABLE_ROLES:
                linears[index].append(LinearTarget(full, module, role, index))
    moe = {ref.index: ref for ref in adapter.moe_layers(model)}
    head = None
    output = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if isinstance(output, nn.Linear) and output.weight is not getattr(embed, "weight", None):
        head_name = next(name for name, module in model.named_modules() if module is output)
        head = LinearTarget(head_name, output, "lm_head", None)
    return ModelTargets(linears=linears, moe=moe, head=head, num_layers=len(layers))


def expert_params(adapter: MoEAdapter, layer: MoELayerRef) -> int:
    """Weight elements of one routed expert of `layer` (gate + up + down, biases excluded)."""
    expert = adapter.expert_weights(layer, 0)
    return sum(w.numel() for w in (expert.gate, expert.up, expert.down) if w is not None)
