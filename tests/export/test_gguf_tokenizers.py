"""Byte-level BPE tokenizers with Qwen2's and Llama-3's split regexes: the llama.cpp pre-tokenizer chosen for
each, and llama.cpp's tokenisation equal to the Hugging Face tokenizer's on the eval text and edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from moecompress.export.gguf import export_gguf  # noqa: E402
from moecompress.io.gguf.tokenizer import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402

EVAL = Path(__file__).resolve().parents[2] / "moecompress" / "example" / "eval"
EDGES = ["Hello  world!!\n\n\tTabs\r\nCRLF 12345 1234567 don't I'M ünïcödé 日本語テキスト  ",
         "  leading spaces and trailing   ", "x\n \n  \n", "'S 'll 'Ve", "1 22 333 4444 55555"]
CASES = [("qwen2", QWEN2_REGEX, False), ("llama-bpe", LLAMA3_REGEX, True)]


def _texts() -> list[str]:
    docs = [json.loads(line)["text"] for path in sorted(EVAL.glob("*.jsonl")) for line in path.read_text().splitlines()
            if line.strip()]
    return docs + EDGES


def _checkpoint(folder: Path, regex: str, ignore_merges: bool) -> tuple[Path, object]:
    """A tiny all-MoE Qwen3-MoE with a BPE tokenizer trained here on a Split(regex) + ByteLevel pre-tokenizer."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.helpers import tiny_model

    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_texts()[:40], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    folder.mkdir(parents=True)
    fast.save_pretrained(folder)
    config = transformers.Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, vocab_size=len(fast),
                                         max_position_embeddings=256, intermediate_size=96, moe_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    tiny_model(config).save_pretrained(folder)
    return folder, fast


@pytest.mark.parametrize("pre,regex,ignore_merges", CASES)
def test_split_regex_picks_the_llama_cpp_pre_tokenizer(tmp_path: Path, pre: str, regex: str,
                                                       ignore_merges: bool) -> None:
    folder, _ = _checkpoint(tmp_path / "model", regex, ignore_merges)
    export_gguf(folder, tmp_path / "model.gguf", output_type="f32", progress=False)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre


@pytest.mark.parametrize("pre,regex,ignore_merges", CASES)
def test_llama_cpp_tokenises_like_hugging_face(tmp_path: Path, pre: str, regex: str, ignore_merges: bool) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, fast = _checkpoint(tmp_path / "model", regex, ignore_merges)
    export_gguf(folder, tmp_path / "model.gguf", output_type="f32", progress=False)
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), vocab_only=True, verbose=False)
    try:
        for text in _texts():
            want = fast(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want, text[:60]
    finally:
        llm.close()
