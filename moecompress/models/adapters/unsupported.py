"""MoE architectures transformers 5.23 ships that no adapter handles, each with a one-line reason.

`get_adapter` turns an entry into a clear MoecompressError. Only types without an adapter may
appear here (tests/unit/test_registry.py checks that the two sets are disjoint).
"""

from moecompress.models.adapters import UNSUPPORTED

_MULTIMODAL = (
    "a multimodal checkpoint that transformers cannot load with AutoModelForCausalLM; "
    "moecompress compresses causal language models"
)

UNSUPPORTED.update(
    {
        "jetmoe": (
            "its attention experts (mixture of attention heads) and MLP experts share one "
            "num_local_experts key, so pruning either set cannot be expressed in its config"
        ),
        "deepseek_v4": (
            "its hash-routed MoE layers pick experts from a frozen token-id -> expert-id table "
            "(tid2eid), so an expert cannot be masked or removed without changing which experts "
            "those tokens use, and its forward fails with output_router_logits=True"
        ),
        "longcat_flash": (
            "its router also chooses zero-compute (identity) experts that have no weights, which "
            "the per-expert contract cannot represent, and its experts bypass transformers' "
            "experts dispatch"
        ),
        "switch_transformers": (
            "an encoder-decoder (T5-style) model; moecompress handles decoder-only causal LMs"
        ),
        "nllb-moe": "an encoder-decoder translation model; moecompress handles decoder-only causal LMs",
        "mistral4": (
            "transformers 5.23 has no AutoModelForCausalLM mapping for it (it is the text model "
            "of multimodal Mistral checkpoints)"
        ),
        "dots3_note": (
            "a multimodal checkpoint whose vision tower has its own routed experts; its text model "
            "(model_type dots3_note_text) is supported"
        ),
        "inkling_mm_model": f"{_MULTIMODAL}; its text model (model_type inkling_text) is supported",
        "inkling2": f"{_MULTIMODAL}; its text model (model_type inkling2_text) is supported",
        "glm4v_moe": _MULTIMODAL,
        "glm5_next": _MULTIMODAL,
        "ernie4_5_vl_moe": _MULTIMODAL,
        "mistral_large4": _MULTIMODAL,
        "deepseek_ocr2": _MULTIMODAL,
        "unlimited_ocr": _MULTIMODAL,
        "step3p7": _MULTIMODAL,
        "muse_spark": _MULTIMODAL,
    }
)
