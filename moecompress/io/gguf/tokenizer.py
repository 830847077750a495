"""A checkpoint's tokenizer.json (byte-level BPE) as GGUF vocabulary keys llama.cpp tokenises with.

llama.cpp has no general pre-tokenizer: `tokenizer.ggml.pre` names one of its built-in regex
sets. A byte-level BPE tokenizer is exported when its pre-tokenizer is one llama.cpp
reproduces exactly (`PRE_TOKENIZERS`, keyed by the split regex):

* `ByteLevel(use_regex=True, add_prefix_space=False)` alone splits with GPT-2's regex:
  llama.cpp's `gpt-2` (the embedded example and the fixtures use this);
* `Sequence[Split(regex, Isolated), ByteLevel(use_regex=False)]` with Qwen2's regex: `qwen2`,
  with Llama-3's regex: `llama-bpe` (which also skips merges for words in the vocabulary, as
  that tokenizer's `ignore_merges` does).

Anything else (SentencePiece/Unigram/WordPiece models, byte fallback, a prefix space, other
regexes or normalizers) is refused in one line with the reason, instead of writing a file whose
tokens differ from the Hugging Face tokenizer's. An NFC normalizer (Qwen's) is accepted:
llama.cpp does not normalise, which changes only text that is not already in NFC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

from moecompress.errors import MoecompressError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# split regex -> (llama.cpp pre-tokenizer name, whether llama.cpp then ignores merges for vocabulary words)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    GPT2_REGEX: ("gpt-2", False),
    QWEN2_REGEX: ("qwen2", False),
    LLAMA3_REGEX: ("llama-bpe", True),
}

ACCEPTED_NORMALIZERS = (None, "NFC")


@dataclass
class GGUFVocab:
    """The vocabulary keys of a GGUF file (`tokenizer.ggml.*`)."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer: GGUFWriter) -> None:
        """Write these keys into `writer`'s metadata."""
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for token_id, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                              (self.pad_id, writer.add_pad_token_id)):
            if token_id is not None:
                add(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _refuse(path: Path, why: str) -> MoecompressError:
    return MoecompressError(f"cannot export the tokenizer in {path}: {why}; llama.cpp would split text differently "
                            "from the Hugging Face tokenizer")


def pre_tokenizer_name(path: Path, spec: dict[str, Any]) -> tuple[str, bool]:
    """(llama.cpp pre-tokenizer name, llama.cpp ignores merges) for a tokenizer.json's pre_tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    kind = pre.get("type")
    regex: str | None = None
    byte_level: dict[str, Any] | None = None
    if kind == "ByteLevel":
        if not pre.get("use_regex", True):
            raise _refuse(path, "its ByteLevel pre-tokenizer does not split words (use_regex false)")
        regex, byte_level = GPT2_REGEX, pre
    elif kind == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
            split, byte_level = parts
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise _refuse(path, f"its Split pre-tokenizer uses behavior {split.get('behavior')!r}, not Isolated")
            if byte_level.get("use_regex", True):
                raise _refuse(path, "it splits twice (a Split regex, then ByteLevel's own regex)")
            regex = (split.get("pattern") or {}).get("Regex")
    if regex is None or byte_level is None:
        raise _refuse(path, f"its pre-tokenizer ({json.dumps(pre)[:120]}) is not a byte-level regex split")
    if byte_level.get("add_prefix_space"):
        raise _refuse(path, "its ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's byte-level BPE does not")
    if regex not in PRE_TOKENIZERS:
        raise _refuse(path, f"its split regex {regex[:80]!r} matches none of llama.cpp's pre-tokenizers known here "
                            f"({', '.join(name for name, _ in PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[regex]


def _check_model(path: Path, spec: dict[str, Any], ignore_merges: bool) -> dict[str, Any]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(path, f"its model is {model.get('type')!r}; export gguf writes byte-level BPE tokenizers only")
    if model.get("byte_fallback"):
        raise _refuse(path, "it uses byte fallback (a SentencePiece-style BPE)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _refuse(path, "it marks subwords with a prefix or suffix")
    if model.get("dropout"):
        raise _refuse(path, "it uses BPE dropout")
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise _refuse(path, f"its ignore_merges is {bool(model.get('ignore_merges'))} but llama.cpp's matching "
                            f"pre-tokenizer uses {ignore_merges}")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in ACCEPTED_NORMALIZERS:
        raise _refuse(path, f"it normalises text ({normalizer}), which llama.cpp does not")
    return model


def _token_id(name: Any, ids: dict[str, int]) -> int | None:
    if isinstance(name, dict):
        name = name.get("content")
    return ids.get(name) if isinstance(name, str) else None


def _adds_bos(spec: dict[str, Any]) -> int | None:
    """The id of a special token the post-processor puts before every text (None: it adds none)."""
    post = spec.get("post_processor") or {}
    if post.get("type") != "TemplateProcessing":
        return None
    single = post.get("single") or []
    first = single[0] if single else {}
    if "SpecialToken" not in first:
        return None
    token = first["SpecialToken"]["id"]
    entry = (post.get("special_tokens") or {}).get(token) or {}
    ids = entry.get("ids") or []
    return int(ids[0]) if ids else None


def read_vocab(folder: str | Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer in `folder`, padded to the model's `vocab_size` rows."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise MoecompressError(f"{folder} has no tokenizer.json; export gguf needs the checkpoint's Hugging Face "
                               "(fast) tokenizer to write the vocabulary")
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, ignore_merges = pre_tokenizer_name(path, spec)
    model = _check_model(path, spec, ignore_merges)
    ids: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    for token_id, entry in added.items():
        ids.setdefault(entry["content"], token_id)
    by_id: dict[int, str] = {}
    for text, token_id in ids.items():
        if token_id in by_id and by_id[token_id] != text:
            raise _refuse(path, f"token id {token_id} names two tokens")
        by_id[token_id] = text
    count = max(by_id) + 1
    if count > vocab_size:
        raise MoecompressError(f"the tokenizer in {folder} has {count} tokens but the model's vocab_size is "
                               f"{vocab_size}; the tokenizer is not this model's")
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        text = by_id.get(token_id)
        if text is None:  # ids the tokenizer never produces (padding rows of the embedding)
            tokens.append(f"[PAD{token_id}]")
            types.append(int(TokenType.UNUSED))
        elif token_id in added:
            tokens.append(text)
            types.append(int(TokenType.CONTROL if added[token_id].get("special") else TokenType.USER_DEFINED))
        else:
            tokens.append(text)
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = _tokenizer_config(folder)
    bos_first = _adds_bos(spec)
    vocab = GGUFVocab(pre=pre, tokens=tokens, types=types, merges=merges,
                      bos_id=_token_id(config.get("bos_token"), ids), eos_id=_token_id(config.get("eos_token"), ids),
                      pad_id=_token_id(config.get("pad_token"), ids), add_bos=bos_first is not None,
                      chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None)
    if bos_first is not None:
        vocab.bos_id = bos_first
    return vocab


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MoecompressError(f"{path} is not valid JSON ({err})") from None
