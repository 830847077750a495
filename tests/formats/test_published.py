"""The published-format fixtures are what real FP8 / MXFP4 checkpoints look like, and transformers reads them.

Checks here decode the on-disk tensors with their own few lines (not the fixture module's), compare with the
bf16 model each fixture started from, and let transformers load every folder on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from tests.formats.published import (
    EXAMPLE_MODEL_DIR,
    iter_stored,
    load_with_transformers,
    reference_state_dict,
    tiny_model,
    write_fp8_checkpoint,
)

BLOCK = (16, 16)
MXFP4_GROUP = 32
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_SIGNED = torch.tensor(E2M1 + [-value for value in E2M1])  # by nibble: bit 3 is the sign
PROMPT = "The quick brown fox jumps over the lazy dog. Then it ran away, far into the woods!"

LOGIT_TOLERANCE = {"deepseek_v3": 0.6, "qwen3_moe": 0.25, "gpt_oss": 0.4}  # relative Frobenius error
FP8_FIXTURES = {"fp8_deepseek": "deepseek_v3", "fp8_qwen3": "qwen3_moe"}
# per arch: (keys that must be FP8 + scale, keys that must stay bf16 without scale, number of FP8 weights)
FP8_EXPECTED = {
    "deepseek_v3": (
        [
            "model.layers.0.mlp.gate_proj.weight",  # dense layer 0
            "model.layers.0.self_attn.q_a_proj.weight",
            "model.layers.1.self_attn.q_b_proj.weight",
            "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.2.self_attn.kv_b_proj.weight",
            "model.layers.2.self_attn.o_proj.weight",
            "model.layers.1.mlp.shared_experts.down_proj.weight",
            "model.layers.1.mlp.experts.0.gate_proj.weight",
            "model.layers.2.mlp.experts.7.up_proj.weight",
            "model.layers.2.mlp.experts.3.down_proj.weight",
        ],
        [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.kv_a_layernorm.weight",
            "model.layers.0.input_layernorm.weight",
        ],
        3 * 5 + 3 + 2 * (3 + 8 * 3),  # attention, dense MLP, shared + routed experts
    ),
    "qwen3_moe": (
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.0.mlp.experts.0.gate_proj.weight",
            "model.layers.1.mlp.experts.7.up_proj.weight",
            "model.layers.1.mlp.experts.4.down_proj.weight",
        ],
        [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.mlp.gate.weight",
            "model.layers.1.self_attn.q_norm.weight",
            "model.layers.1.self_attn.k_norm.weight",
        ],
        2 * (4 + 8 * 3),
    ),
}


# --------------------------------------------------------------------------------------------------------------
# helpers


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors, keyed as on disk."""
    return dict(iter_stored(folder))


def quantization_config(folder: Path) -> dict:
    """The folder's config.json ``quantization_config``."""
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.fixture(scope="module")
def bf16_on_disk(tmp_path_factory: pytest.TempPathFactory):
    """``(arch, ragged) -> {disk key: bf16 tensor}`` of the unquantised model a fixture started from."""
    cache: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}

    def get(arch: str, ragged: bool = False) -> dict[str, torch.Tensor]:
        if (arch, ragged) not in cache:
            folder = tmp_path_factory.mktemp(f"bf16_{arch}")
            tiny_model(arch, ragged=ragged).save_pretrained(folder)
            with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
                cache[arch, ragged] = {key: handle.get_tensor(key) for key in handle.keys()}
        return cache[arch, ragged]

    return get


def dequantize_fp8(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 [out, in] times its block's scale_inv ([ceil(out/b0), ceil(in/b1)]), in float32."""
    out, inp = fp8.shape
    scales = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out, :inp]
    return fp8.float() * scales


def block_error_and_amax(
    approx: torch.Tensor, exact: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b0, b1) block of [..., out, in] (edge blocks partial): max |approx - exact| and max |exact|."""
    *lead, out, inp = exact.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])

    def tiles(tensor: torch.Tensor) -> torch.Tensor:  # [..., rows, b0, cols, b1], zero-padded
        padded = torch.zeros(*lead, rows * block[0], cols * block[1])
        padded[..., :out, :inp] = tensor.float()
        return padded.view(*lead, rows, block[0], cols, block[1])

    error = (tiles(approx) - tiles(exact)).abs().amax(dim=(-3, -1))  # [..., rows, cols]
    return error, tiles(exact).abs().amax(dim=(-3, -1))


def assert_blockwise_close(approx: torch.Tensor, exact: torch.Tensor, block: tuple[int, int], frac: float) -> None:
    """Every block's max error is at most ``frac`` of that block's amax."""
    error, amax = block_error_and_amax(approx, exact, block)
    assert (error <= frac * amax).all(), f"worst block error / amax {(error / amax.clamp_min(1e-12)).max():.4f}"


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, G, 16] uint8 blocks and [..., out, G] e8m0 scales -> float32 [..., out, G * 32]."""
    low, high = E2M1_SIGNED[(blocks & 0x0F).long()], E2M1_SIGNED[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., out, G, 32], low nibble first
    return (values * torch.exp2(scales.float() - 127).unsqueeze(-1)).flatten(-2)


def logits_of(model: torch.nn.Module, folder: Path) -> torch.Tensor:
    """float32 logits [tokens, vocab] of ``model`` on ``PROMPT``, tokenised by the folder's own tokenizer."""
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def assert_logits_close(folder: Path, arch: str) -> None:
    """transformers' load of ``folder`` gives finite logits close to the bf16 model's.

    Loose on purpose (``LOGIT_TOLERANCE``): FP8 / MXFP4 noise of a few percent a weight compounds over the
    layers and, in these random tiny models, flips the top-k choice of some tokens (DeepSeek's sigmoid routing
    behind a dense MLA layer most: about 20% of its routes), which moves those tokens' logits a lot. Seen with
    transformers 5.23: relative error 0.42 (DeepSeek), 0.08 (Qwen3), 0.18 (gpt-oss); a model with unrelated
    weights scores 1.4 and a mean cosine of 0. The tests check the exact decoding weight by weight.
    """
    quantised = logits_of(load_with_transformers(folder), folder)
    original = logits_of(tiny_model(arch), folder)
    assert torch.isfinite(quantised).all()
    error = (quantised - original).norm() / original.norm()
    cosine = torch.nn.functional.cosine_similarity(quantised, original, dim=-1).mean()
    tolerance = LOGIT_TOLERANCE[arch]
    message = f"relative error {error:.3f}, mean cosine {cosine:.3f}"
    assert error < tolerance and cosine > 1 - tolerance / 2, message


# --------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("name", [*FP8_FIXTURES, "mxfp4_gptoss"])
def test_folder_has_example_tokenizer_matching_vocab(name: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(name)
    config = json.loads((folder / "config.json").read_text())
    example = json.loads((EXAMPLE_MODEL_DIR / "config.json").read_text())
    assert config["vocab_size"] == example["vocab_size"] == len(AutoTokenizer.from_pretrained(folder))
    assert stored(folder)["model.embed_tokens.weight"].shape[0] == config["vocab_size"]


# --------------------------------------------------------------------------------------------------------------
# FP8 block-scaled


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_fp8_on_disk_dtypes_shapes_and_config(name: str, request: pytest.FixtureRequest, bf16_on_disk) -> None:
    folder, arch = request.getfixturevalue(name), FP8_FIXTURES[name]
    tensors, originals = stored(folder), bf16_on_disk(arch)
    quantised, kept, count = FP8_EXPECTED[arch]

    scaled = sorted(key.removesuffix("_scale_inv") for key in tensors if key.endswith("weight_scale_inv"))
    assert len(scaled) == count
    assert set(tensors) == set(originals) | {f"{key}_scale_inv" for key in scaled}
    for key in quantised:
        assert key in scaled
    for key in kept:
        assert key not in scaled and tensors[key].dtype == originals[key].dtype == torch.bfloat16
    for key in scaled:
        out, inp = originals[key].shape
        assert tensors[key].dtype == torch.float8_e4m3fn and tensors[key].shape == (out, inp)
        scale = tensors[f"{key}_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (math.ceil(out / 16), math.ceil(inp / 16))
        assert (scale > 0).all()
    for key in set(originals) - set(scaled):
        assert torch.equal(tensors[key], originals[key]), key

    config = quantization_config(folder)
    skip = config.pop("modules_to_not_convert")
    assert config == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    }
    assert "lm_head" in skip and "model.layers.1.mlp.gate" in skip
    assert not [key for key in scaled for module in skip if key.startswith(module + ".")]


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_fp8_blocks_decode_to_the_bf16_weights(name: str, request: pytest.FixtureRequest, bf16_on_disk) -> None:
    folder, arch = request.getfixturevalue(name), FP8_FIXTURES[name]
    tensors, originals = stored(folder), bf16_on_disk(arch)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for key in (k.removesuffix("_scale_inv") for k in tensors if k.endswith("_scale_inv")):
        scale = tensors[f"{key}_scale_inv"]
        decoded = dequantize_fp8(tensors[key], scale, BLOCK)
        # e4m3 has 3 mantissa bits: round-to-nearest is within 1/28 of the block amax (half a step at 448)
        assert_blockwise_close(decoded, originals[key], BLOCK, 1 / 16)
        _, amax = block_error_and_amax(originals[key], originals[key], BLOCK)
        torch.testing.assert_close(scale, torch.where(amax > 0, amax / fp8_max, 1.0))


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_transformers_dequantises_fp8_close_to_bf16(name: str, request: pytest.FixtureRequest) -> None:
    folder, arch = request.getfixturevalue(name), FP8_FIXTURES[name]
    reference, original = reference_state_dict(folder), tiny_model(arch).state_dict()
    assert set(reference) == set(original)
    changed = 0
    for key, tensor in reference.items():
        if torch.equal(tensor.float(), original[key].float()):
            continue  # not quantised (embeddings, norms, router, correction bias) comes back exact
        changed += 1
        assert tensor.dtype == torch.bfloat16 and ".layers." in key and "mlp.gate." not in key, key
        assert_blockwise_close(tensor, original[key], BLOCK, 1 / 16)  # fused experts: [E, out, in]
    assert changed >= 4 * tiny_model(arch).config.num_hidden_layers
    assert_logits_close(folder, arch)


@pytest.mark.parametrize("name", FP8_FIXTURES)
def test_transformers_native_fp8_load_finds_every_scale(
    name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without dequantising (what a GPU gets), transformers expects a scale exactly where the folder has one.

    Off a GPU transformers always dequantises, so its environment check is patched away to load the
    FP8Linear / FP8Experts modules on the CPU (no forward pass): this checks ``modules_to_not_convert``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    folder = request.getfixturevalue(name)
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, FP8Linear) and isinstance(layer.mlp.experts, FP8Experts)
    assert layer.mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert not isinstance(model.lm_head, FP8Linear) and layer.mlp.gate.weight.dtype == torch.bfloat16


def test_fp8_ragged_blocks(fp8_deepseek_ragged: Path, bf16_on_disk) -> None:
    """Partial edge blocks: ceil-shaped scales that decode right; transformers 5.23 refuses them on the CPU."""
    tensors, originals = stored(fp8_deepseek_ragged), bf16_on_disk("deepseek_v3", ragged=True)
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert tensors[kv_a].shape == (40, 64) and tensors[f"{kv_a}_scale_inv"].shape == (3, 4)
    down = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert tensors[down].shape == (64, 40) and tensors[f"{down}_scale_inv"].shape == (4, 3)
    for key in (k.removesuffix("_scale_inv") for k in tensors if k.endswith("_scale_inv")):
        decoded = dequantize_fp8(tensors[key], tensors[f"{key}_scale_inv"], BLOCK)
        assert_blockwise_close(decoded, originals[key], BLOCK, 1 / 16)
    # transformers derives the block as rows // scale_rows (40 // 3), so it cannot load this; should it learn
    # to, its weights must then be right
    try:
        reference = reference_state_dict(fp8_deepseek_ragged)
    except (RuntimeError, ValueError) as error:
        assert "divisible" in str(error) or "conversion" in str(error).lower()
        return
    original = tiny_model("deepseek_v3", ragged=True).state_dict()
    for key, tensor in reference.items():
        assert_blockwise_close(tensor, original[key], BLOCK, 1 / 16)


def test_fp8_e5m2_option(tmp_path: Path, bf16_on_disk) -> None:
    folder = write_fp8_checkpoint(tmp_path / "e5m2", "qwen3_moe", fp8_dtype=torch.float8_e5m2)
    tensors, originals = stored(folder), bf16_on_disk("qwen3_moe")
    key = "model.layers.0.mlp.experts.3.gate_proj.weight"
    assert tensors[key].dtype == torch.float8_e5m2 and quantization_config(folder)["fmt"] == "e5m2"
    # e5m2 has 2 mantissa bits: within 1/14 of the block amax at the top binade
    decoded = dequantize_fp8(tensors[key], tensors[f"{key}_scale_inv"], BLOCK)
    assert_blockwise_close(decoded, originals[key], BLOCK, 1 / 8)
    reference, original = reference_state_dict(folder), tiny_model("qwen3_moe").state_dict()
    fused = "model.layers.0.mlp.experts.gate_up_proj"  # [E, 2I, H]
    assert_blockwise_close(reference[fused], original[fused], BLOCK, 1 / 8)


# --------------------------------------------------------------------------------------------------------------
# MXFP4 experts


def test_mxfp4_on_disk_dtypes_shapes_and_config(mxfp4_gptoss: Path, bf16_on_disk) -> None:
    tensors, originals = stored(mxfp4_gptoss), bf16_on_disk("gpt_oss")
    experts, hidden, inter = 4, 64, 64
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        assert f"{prefix}.gate_up_proj" not in tensors and f"{prefix}.down_proj" not in tensors
        shapes = {
            "gate_up_proj_blocks": (experts, 2 * inter, hidden // 32, 16),
            "gate_up_proj_scales": (experts, 2 * inter, hidden // 32),
            "down_proj_blocks": (experts, hidden, inter // 32, 16),
            "down_proj_scales": (experts, hidden, inter // 32),
        }
        for name, shape in shapes.items():
            assert tensors[f"{prefix}.{name}"].dtype == torch.uint8 and tensors[f"{prefix}.{name}"].shape == shape
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            assert tensors[f"{prefix}.{name}"].dtype == torch.bfloat16
    quantised = {k.rsplit("_", 1)[0] for k in tensors if k.endswith(("_blocks", "_scales"))}
    packed = {f"{key}_{part}" for key in quantised for part in ("blocks", "scales")}
    assert set(tensors) == (set(originals) - quantised) | packed
    for key in set(originals) - quantised:  # attention, sinks, router, biases, embeddings, lm_head: as saved
        assert torch.equal(tensors[key], originals[key]), key

    config = quantization_config(mxfp4_gptoss)
    assert config["quant_method"] == "mxfp4"
    assert set(config["modules_to_not_convert"]) == {
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    }


def test_mxfp4_blocks_are_nearest_e2m1_with_tight_exponent(mxfp4_gptoss: Path, bf16_on_disk) -> None:
    tensors, originals = stored(mxfp4_gptoss), bf16_on_disk("gpt_oss")
    grid = torch.tensor(E2M1)
    for key in (k.removesuffix("_blocks") for k in tensors if k.endswith("_blocks")):
        blocks, scales = tensors[f"{key}_blocks"], tensors[f"{key}_scales"]
        exact = originals[key].float().transpose(-1, -2)  # [E, in, out] -> [E, out, in], 32-groups along in
        scale = torch.exp2(scales.float() - 127).repeat_interleave(MXFP4_GROUP, -1)  # [E, out, in]
        ratio, decoded = exact / scale, decode_mxfp4(blocks, scales) / scale
        nearest = (ratio.abs().unsqueeze(-1) - grid).abs().amin(-1)  # distance to the nearest grid value
        assert ((ratio - decoded).abs() <= nearest + 1e-6).all(), key
        groups = ratio.abs().unflatten(-1, (-1, MXFP4_GROUP)).amax(-1)  # [E, out, G], amax / scale
        assert ((groups <= 6) & (groups > 3)).all(), key  # the smallest exponent that clips nothing


def test_transformers_dequantises_mxfp4_close_to_bf16(mxfp4_gptoss: Path) -> None:
    tensors = stored(mxfp4_gptoss)
    reference, original = reference_state_dict(mxfp4_gptoss), tiny_model("gpt_oss").state_dict()
    assert set(reference) == set(original)
    for key, tensor in reference.items():
        if f"{key}_blocks" not in tensors:
            assert torch.equal(tensor, original[key]), key
            continue
        decoded = decode_mxfp4(tensors[f"{key}_blocks"], tensors[f"{key}_scales"]).transpose(-1, -2)
        assert tensor.dtype == torch.bfloat16 and tensor.shape == original[key].shape  # [E, in, out]
        assert torch.equal(tensor.float(), decoded), key  # grid values times powers of two: exact in bf16
        # MXFP4 grid: a value is off by at most half a grid step, at most 1 of 6 scale units (1/3 of the amax)
        assert_blockwise_close(tensor.transpose(-1, -2), original[key].transpose(-1, -2), (1, MXFP4_GROUP), 1 / 3)
    assert_logits_close(mxfp4_gptoss, "gpt_oss")
