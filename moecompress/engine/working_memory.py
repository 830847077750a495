"""Activation memory of one decoder layer's forward pass, estimated before the layer is loaded.

A layer's weights are not all a pass holds while the layer runs: each linear's output, the
attention scores and their softmax exist at once for a batch. For DeepSeek-V3 (128 heads,
q/kv projections 3.4x and 4.6x the hidden width, a dense MLP of 18432) one batch of 8
windows of 256 tokens takes about 1.7 GiB in float32 on top of the layer's 2.2 GiB of
weights: more than the weights of a group of experts, so a budget that ignores it is
overrun. Per token the estimate counts, in float32 (see `layer_working_bytes`),

    W_act = F x ( sum over the layer's linears outside the routed experts of out_features
                  + 2 x heads x seq_len                 # attention scores and probabilities
                  + 2 x hidden )                        # the routed experts' output and its float32 sum

with F = `WORKING_FACTOR` for the temporaries between them (rotary embeddings, concatenated
heads, activation functions). F was set from peaks measured on the CPU at DeepSeek-V3's shapes
(batches of 8 windows of 256 tokens): 1.16x the sum for its dense layer in float32 and 1.24x
in bfloat16, 0.94x for a MoE layer in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moecompress.models.load import text_config

if TYPE_CHECKING:
    from moecompress.engine.reader import CheckpointReader

WORKING_FACTOR = 1.3


def _routed_experts(reader: CheckpointReader) -> set[nn.Module]:
    return {ref.experts for ref in reader.adapter.moe_layers(reader.model)}


def _linear_widths(layer: nn.Module, skip: set[nn.Module]) -> int:
    """Sum of out_features of the linears in `layer` outside the modules in `skip` (and their children)."""
    total = 0
    stack = [layer]
    while stack:
        module = stack.pop()
        if module in skip:
            continue
        if isinstance(module, nn.Linear):
            total += module.out_features
        stack.extend(module.children())
    return total


def working_elements_per_token(reader: CheckpointReader, seq_len: int) -> int:
    """Activation elements per token the widest decoder layer holds at once while it runs (before `WORKING_FACTOR`)."""
    config = text_config(reader.config)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(config.hidden_size)
    skip = _routed_experts(reader)
    widest = max((_linear_widths(layer, skip) for layer in reader.adapter.decoder_layers(reader.model)), default=0)
    return widest + 2 * heads * int(seq_len) + 2 * hidden


def layer_working_bytes(reader: CheckpointReader, rows: int, seq_len: int) -> int:
    """Bytes of activations one decoder layer holds while it runs a batch of `rows` windows of `seq_len` tokens.

    Counted in float32 whatever the compute dtype: on the CPU a bfloat16 layer's working set
    was measured as large as a float32 one's (attention's scores are computed in float32).
    """
    return int(WORKING_FACTOR * max(reader.dtype.itemsize, 4) * rows * seq_len * working_elements_per_token(reader, seq_len))
