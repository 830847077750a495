"""Names of the weight dtypes moecompress accepts, without importing torch."""

from __future__ import annotations

# accepted spelling -> canonical torch dtype name ("auto": keep what the checkpoint stores)
DTYPE_ALIASES: dict[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
