"""Calibration data: formats, domain specs, token streams, windows, digests and the shipped sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moecompress.calibration import data
from moecompress.calibration.data import (
    CalibrationSet,
    DomainSource,
    build_calibration_set,
    default_calibration_sources,
    parse_data_specs,
    read_texts,
    token_stream,
    windows,
)
from moecompress.errors import MoecompressError

TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Calibration data is tokenised with the model's own tokenizer.",
    "class Expert:\n    pass\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE (every byte is a token, so any text encodes) with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- specs


def test_parse_specs_named_and_default_names(tmp_path):
    (tmp_path / "code.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "notes.txt").write_text("hello")
    sources = parse_data_specs([f"py={tmp_path / 'code.jsonl'}", str(tmp_path / "notes.txt")], field="content")
    assert [s.name for s in sources] == ["py", "notes"]
    assert sources[0] == DomainSource("py", tmp_path / "code.jsonl", "content")
    assert parse_data_specs([]) == []


def test_parse_specs_path_containing_equals_sign(tmp_path):
    odd = tmp_path / "a=b.txt"
    odd.write_text("text")
    (source,) = parse_data_specs([str(odd)])
    assert source.path == odd and source.name == "a=b"


@pytest.mark.parametrize(
    "make_values, message",
    [
        (lambda d: [f"x={d / 'missing.txt'}"], "does not exist"),
        (lambda d: [f"x={d / 'table.csv'}"], "supported: .txt, .jsonl, .parquet"),
        (lambda d: [f"a={d / 'one.txt'}", f"a={d / 'two.txt'}"], "used twice"),
        (lambda d: [str(d / "one.txt"), str(d / "sub" / "one.txt")], "used twice"),
        (lambda d: [f"bad name={d / 'one.txt'}"], "invalid domain name"),
        (lambda d: [str(d / "plain_folder")], "save_to_disk"),
        (lambda d: ["name="], "has no path"),
    ],
)
def test_parse_specs_rejects_bad_input(tmp_path, make_values, message):
    for path in ("one.txt", "two.txt", "table.csv", "sub/one.txt"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("text")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(MoecompressError, match=message) as info:
        parse_data_specs(make_values(tmp_path))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- formats


def test_txt_documents_split_at_two_blank_lines(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("First doc, para 1.\n\nFirst doc, para 2.\n\n\nSecond doc.\r\n\r\n  \r\n\nThird.\n\n\n\n")
    assert read_texts(DomainSource("d", path)) == ["First doc, para 1.\n\nFirst doc, para 2.", "Second doc.", "Third."]


def test_txt_without_breaks_is_one_document(tmp_path):
    path = tmp_path / "whole.txt"
    path.write_text("line one\nline two\n\nparagraph two\n")
    assert read_texts(DomainSource("w", path)) == ["line one\nline two\n\nparagraph two"]


def test_txt_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MoecompressError, match="not UTF-8"):
        read_texts(DomainSource("l", path))


def test_jsonl_field_option_and_skips_empty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "alpha", "id": 1}, {"content": ""}, {"content": None}, {"content": "beta"}])
    with_blank_line = path.read_text() + "\n\n"
    path.write_text(with_blank_line)
    assert read_texts(DomainSource("d", path, field="content")) == ["alpha", "beta"]


def test_jsonl_missing_field_lists_fields_seen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "alpha", "id": 1}])
    with pytest.raises(MoecompressError, match=r"no field 'text' \(fields seen: content, id\)"):
        read_texts(DomainSource("d", path))


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "not valid JSON"), ('["a list"]', "not an object"), ('{"text": 3}', "holds a int, not text")],
)
def test_jsonl_bad_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(MoecompressError, match=message) as info:
        read_texts(DomainSource("b", path))
    assert "line 2" in str(info.value)


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one", "", "two"], "n": [1, 2, 3]}), path)
    assert read_texts(DomainSource("p", path, field="body")) == ["one", "two"]
    with pytest.raises(MoecompressError, match=r"no column 'text' \(columns: body, n\)"):
        read_texts(DomainSource("p", path))
    with pytest.raises(MoecompressError, match="not text"):
        read_texts(DomainSource("p", path, field="n"))


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(MoecompressError, match="not a readable parquet"):
        read_texts(DomainSource("p", path))


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = datasets.Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]})
    single.save_to_disk(str(tmp_path / "single"))
    assert read_texts(DomainSource("s", tmp_path / "single")) == ["a", "b"]

    datasets.DatasetDict({"train": single, "test": datasets.Dataset.from_dict({"text": ["z"]})}).save_to_disk(str(tmp_path / "dd"))
    assert read_texts(DomainSource("dd", tmp_path / "dd")) == ["a", "b"]

    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(str(tmp_path / "only"))
    assert read_texts(parse_data_specs([str(tmp_path / "only")])[0]) == ["v"]

    two = datasets.DatasetDict({"validation": single, "test": single})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(MoecompressError, match="splits validation, test and no 'train'"):
        read_texts(DomainSource("t", tmp_path / "two"))
    with pytest.raises(MoecompressError, match=r"no column 'body' \(columns: text, n\)"):
        read_texts(DomainSource("s", tmp_path / "single", field="body"))


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(MoecompressError, match="holds no text"):
        read_texts(DomainSource("blank", tmp_path / "blank.txt"))


# --------------------------------------------------------------------------- tokens and windows


def test_token_stream_joins_documents_with_eos(tokenizer):
    stream = token_stream(tokenizer, ["def add", "the fox"])
    eos = tokenizer.eos_token_id
    first = tokenizer("def add", add_special_tokens=False)["input_ids"]
    second = tokenizer("the fox", add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == first + [eos] + second + [eos]


def test_token_stream_falls_back_to_bos(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bos_only = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<eos>")
    assert bos_only.eos_token_id is None
    assert token_stream(bos_only, ["ab"]).tolist()[-1] == bos_only.bos_token_id


def test_windows_are_non_overlapping_and_ordered():
    stream = torch.arange(103)
    all_windows = windows(stream, 10)
    assert all_windows.shape == (10, 10)
    assert torch.equal(all_windows.flatten(), torch.arange(100))
    assert torch.equal(windows(stream, 10, count=3), torch.arange(30).view(3, 10))


def test_seeded_windows_are_distinct_and_deterministic():
    stream = torch.arange(1000)
    first = windows(stream, 10, count=20, seed=7)
    assert torch.equal(first, windows(stream, 10, count=20, seed=7))
    assert not torch.equal(first, windows(stream, 10, count=20, seed=8))
    starts = first[:, 0]
    assert len(set(starts.tolist())) == 20 and all(start % 10 == 0 for start in starts.tolist())
    assert torch.equal(first - first[:, :1], torch.arange(10).expand(20, 10))


def test_windows_too_little_text_says_how_much():
    with pytest.raises(MoecompressError, match="has 25 tokens, 2 window.* 3 window.* need 30 tokens"):
        windows(torch.arange(25), 10, count=3)
    with pytest.raises(MoecompressError, match="has 5 tokens, 0 window"):
        windows(torch.arange(5), 10)
    with pytest.raises(MoecompressError, match="at least 1"):
        windows(torch.arange(50), 0)


# --------------------------------------------------------------------------- calibration set


@pytest.fixture
def two_domains(tmp_path):
    code = write_jsonl(tmp_path / "code.jsonl", [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(40)])
    prose = tmp_path / "prose.txt"
    prose.write_text("\n\n\n".join(f"Paragraph {i} tells the quick brown fox to jump." for i in range(40)))
    return parse_data_specs([f"code={code}", f"prose={prose}"])


def test_build_calibration_set(tokenizer, two_domains):
    calib = build_calibration_set(tokenizer, two_domains, num_samples=4, seq_len=16, seed=0)
    assert isinstance(calib, CalibrationSet)
    assert calib.input_ids.shape == (8, 16) and calib.input_ids.dtype == torch.long
    assert calib.domains == ["code", "prose"]
    assert calib.domain_ids.tolist() == [0] * 4 + [1] * 4
    assert [s["num_samples"] for s in calib.sources] == [4, 4]
    assert [s["num_texts"] for s in calib.sources] == [40, 40]
    assert all(s["num_tokens"] >= 64 for s in calib.sources)
    assert calib.num_tokens == 128 and len(calib.digest) == 64
    assert calib.record()["sources"][0]["path"].endswith("code.jsonl")
    batches = list(calib.domain_batches(3))
    assert [(name, rows.shape[0]) for name, rows in batches] == [("code", 3), ("code", 1), ("prose", 3), ("prose", 1)]
    assert torch.equal(torch.cat([rows for _, rows in batches]), calib.input_ids)


def test_calibration_set_is_reproducible_and_digest_tracks_data(tokenizer, two_domains, tmp_path):
    first = build_calibration_set(tokenizer, two_domains, num_samples=4, seq_len=16, seed=0)
    again = build_calibration_set(tokenizer, two_domains, num_samples=4, seq_len=16, seed=0)
    assert first.digest == again.digest and torch.equal(first.input_ids, again.input_ids)
    assert build_calibration_set(tokenizer, two_domains, num_samples=4, seq_len=16, seed=1).digest != first.digest
    # a domain's samples depend on its name and the seed, not on the other domains
    alone = build_calibration_set(tokenizer, two_domains[1:], num_samples=4, seq_len=16, seed=0)
    assert torch.equal(alone.input_ids, first.input_ids[4:])
    # edit the data: the digest changes
    code = two_domains[0].path
    code.write_text(code.read_text().replace("return x", "return -x"))
    assert build_calibration_set(tokenizer, two_domains, num_samples=4, seq_len=16, seed=0).digest != first.digest


def test_digest_depends_on_domain_names():
    rows = torch.arange(8).view(2, 4)
    assert data.calibration_digest(["a"], [rows]) != data.calibration_digest(["b"], [rows])


def test_build_names_the_short_domain(tokenizer, two_domains):
    with pytest.raises(MoecompressError, match="domain 'code' .* need"):
        build_calibration_set(tokenizer, two_domains, num_samples=10_000, seq_len=16, seed=0)
    with pytest.raises(MoecompressError, match="no calibration data"):
        build_calibration_set(tokenizer, [], num_samples=1, seq_len=16, seed=0)


# --------------------------------------------------------------------------- shipped sets


def test_shipped_sets_load_and_tokenize(tokenizer):
    sources = default_calibration_sources()
    assert [s.name for s in sources] == ["code", "docs", "prose"]
    assert sources[0].path.parent == data.shipped_calibration_dirs()[0]  # the package copy wins
    for source in sources:
        texts = read_texts(source)
        assert len(texts) >= 20
        assert 100_000 <= sum(len(text.encode()) for text in texts) <= 300_000
    calib = build_calibration_set(tokenizer, sources, num_samples=8, seq_len=256, seed=0)
    assert calib.input_ids.shape == (24, 256)
    assert all(s["num_tokens"] >= 50_000 for s in calib.sources)
    decoded = tokenizer.decode(calib.input_ids[calib.domain_ids == 0][0])
    assert decoded.strip()


def test_repo_and_package_copies_match():
    package_dir, repo_dir = data.shipped_calibration_dirs()
    if not repo_dir.is_dir():
        pytest.skip("not running from a source checkout")
    shipped = sorted(p.relative_to(package_dir) for p in package_dir.rglob("*") if p.is_file())
    assert {"code.jsonl", "docs.jsonl", "prose.jsonl", "MANIFEST.json", "README.md"} <= {str(p) for p in shipped}
    for relative in shipped:
        assert (repo_dir / relative).read_bytes() == (package_dir / relative).read_bytes(), relative


def test_build_script_reproduces_shipped_sets(monkeypatch):
    """calibration/build_sets.py regenerates the shipped files byte for byte (same Python and package versions)."""
    import importlib.metadata
    import importlib.util
    import platform

    package_dir, repo_dir = data.shipped_calibration_dirs()
    script = repo_dir / "build_sets.py"
    if not script.is_file():
        pytest.skip("not running from a source checkout")
    manifest = json.loads((repo_dir / "MANIFEST.json").read_text())
    versions = {name: info["version"] for name, info in manifest["docs"]["packages"].items()}
    installed = {}
    for name in versions:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed[name] = None
    if manifest["code"]["python"] != platform.python_version() or installed != versions:
        pytest.skip("the shipped sets were built with other Python or package versions")
    spec = importlib.util.spec_from_file_location("build_sets", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_sets", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    outputs = module.build_all()
    assert module.differences(outputs, repo_dir) == []
    assert module.differences(outputs, package_dir) == []
