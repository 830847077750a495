"""A checkpoint's in-memory tensor names -> GGUF tensor names, through `gguf`'s own name map.

`gguf.get_tensor_name_map(arch, n_blocks)` knows the Hugging Face spellings of every tensor
llama.cpp reads (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`), including
the stacked routed experts (`model.layers.3.mlp.experts.gate_proj` -> `blk.3.ffn_gate_exps`).
Routed experts are written stacked per layer under `EXPERT_PROJECTIONS`' names.
"""

from __future__ import annotations

from gguf import TensorNameMap, get_tensor_name_map

from moecompress.errors import MoecompressError
from moecompress.io.gguf.arches import GGUFArch

# canonical expert projection -> the name a stacked tensor of them has in gguf's map (under the experts module)
EXPERT_PROJECTIONS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


class GGUFNames:
    """Resolves module keys of one checkpoint to GGUF tensor names for its llama.cpp arch."""

    def __init__(self, spec: GGUFArch, num_layers: int) -> None:
        self.spec = spec
        self.map: TensorNameMap = get_tensor_name_map(spec.arch, num_layers)

    def resolve(self, key: str) -> str:
        """The GGUF name of module key `key` (e.g. `model.norm.weight` -> `output_norm.weight`)."""
        spelled = key
        for old, new in self.spec.key_aliases:
            spelled = spelled.replace(old, new)
        name = self.map.get_name(spelled, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MoecompressError(f"export gguf does not know where llama.cpp's {self.spec.arch_name} keeps the "
                                   f"checkpoint tensor {key}; this checkpoint has a tensor the architecture lacks")
        return name

    def experts(self, experts_path: str, projection: str) -> str:
        """The GGUF name of layer's stacked `projection` experts (`blk.N.ffn_gate_exps.weight`)."""
        return self.resolve(f"{experts_path}.{projection}.weight")
