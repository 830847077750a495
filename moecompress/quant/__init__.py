"""Mixed-precision quantisation of MoE checkpoints: GPTQ / RTN, sensitivity, bit allocation, writers, loader.

Modules, each with one job:

* `spec`: `QuantSpec` (bits, group size, symmetry, act-order, damping) and `QuantizedWeight`
  (integer codes + fp16 scales + integer zeros + g_idx, and its dequantisation);
* `rtn`: the uniform quantisation grid and round-to-nearest;
* `gptq`: GPTQ (statistics with `add_batch`, then `quantize`);
* `pack`: the GPTQ v1 int32 packing of codes and zeros for 2, 3, 4 and 8 bits (and 1 bit);
* `plan`: `QuantPlan`, the per-module settings of a whole model, its average bits and
  GPTQModel's `dynamic` map;
* `sensitivity`: MC-MoE and GEMQ costs per (expert, bit-width);
* `allocate`: the PuLP integer programs that choose a bit-width per expert;
* `apply`: the layer-at-a-time quantisation loop;
* `load`: moecompress's own loader for the GPTQ checkpoints it writes.
"""
