"""A checkpoint folder without its tokenizer is refused, not calibrated with an empty one.

transformers 5 builds an empty tokenizer (a vocabulary of 1) of the config's class when a
folder has no tokenizer files, so `calibrate` used to run on texts tokenised to nothing and
save statistics as if all were well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from moecompress.errors import MoecompressError
from moecompress.models.load import load_tokenizer
from tests.cli_helpers import error_lines, make_checkpoint, run_cli

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def without_tokenizer(folder: Path, keep: tuple[str, ...] = ()) -> Path:
    for name in TOKENIZER_FILES:
        if name not in keep:
            (folder / name).unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)], ids=["no-files", "config-only"])
def test_calibrate_refuses_a_folder_without_tokenizer(checkpoint, keep, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    model = without_tokenizer(Path(shutil.copytree(checkpoint, tmp_path / "model")), keep)
    before = digest(model)
    out = tmp_path / "stats"
    code, _, err = run_cli(["calibrate", str(model), "-o", str(out), "--samples", "2", "--seq-len", "16"],
                           monkeypatch, capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert line == (f"error: {model} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + "
                    "merges.txt, ...); save the model's tokenizer beside it with tokenizer.save_pretrained(folder)")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no output or temporary folder is left"
    assert digest(model) == before, "the input folder is untouched"


def test_a_saved_tokenizer_still_loads(checkpoint) -> None:
    assert len(load_tokenizer(checkpoint)) == json.loads((checkpoint / "config.json").read_text())["vocab_size"]


def test_empty_tokenizer_is_refused(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=empty, unk_token="<unk>").save_pretrained(tmp_path)
    with pytest.raises(MoecompressError, match=r"tokenizer is empty \(its vocabulary has 1 token\).*save_pretrained"):
        load_tokenizer(tmp_path)


def test_a_smaller_tokenizer_than_the_embeddings_loads(checkpoint, tmp_path) -> None:
    """Padded (or, in the cost benchmarks, far larger) embedding tables are allowed."""
    import shutil

    folder = Path(shutil.copytree(checkpoint, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 32 * config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    assert len(load_tokenizer(folder)) == 300
