"""Export stages: write a checkpoint in a format another engine runs (GGUF for llama.cpp).

* `gguf`: the export itself (`export gguf`), a decoder layer at a time;
* `refusals`: what it refuses, in one line;
* `gguf_budget`, `gguf_sensitivity`, `gguf_allocate`, `gguf_mix`: `--bits` / `--size`, one GGML
  type per tensor (the budget, the calibration errors, the program, the orchestration).
"""
