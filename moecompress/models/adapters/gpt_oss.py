"""GPT-OSS: router with a logit bias, top-k on the logits, softmax over the k chosen.

Experts are stored transposed ((E, H, 2I) / (E, I, H)), with gate and up interleaved along
the intermediate axis and biases on both projections, and use a clamped SwiGLU
((up + 1) * gate * sigmoid(alpha * gate)). The base adapter reads all of that from the
experts module's `is_transposed` / `is_concatenated` / `has_bias` flags and its own
`_apply_gate`; this file only names the router bias, which is sliced with the router rows.
The MoE block returns (hidden, router_scores), which the decoder layer unpacks itself.
"""

from moecompress.models.adapters import register
from moecompress.models.adapters.base import MoEAdapter


@register
class GptOssAdapter(MoEAdapter):
    model_types = ("gpt_oss",)
    routing = "topk-softmax (router bias)"
    block_attrs = ("mlp",)
    router_attr = "router"
    router_bias_attr = "bias"
    expert_count_keys = ("num_local_experts",)
    intermediate_size_key = "intermediate_size"
