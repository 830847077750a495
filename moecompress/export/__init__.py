"""Export stages: write a checkpoint in a format another engine runs (GGUF for llama.cpp)."""
