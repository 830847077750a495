"""Calibration data: local text files in, fixed-length token windows per named domain out.

Pipeline (each step a small function, so commands and benchmarks can reuse any of them):

1. `parse_data_specs(["code=src.jsonl", "notes.txt"])` -> `DomainSource`s (CLI `--data`
   values; a value without `name=` is named after the file stem).
2. `read_texts(source)` -> the documents of one source. Formats: `.txt`, `.jsonl`,
   `.parquet`, or a folder written by `datasets`' `save_to_disk`. Everything is local; nothing
   is ever fetched from a hub.
3. `token_stream(tokenizer, texts)` -> one (L,) stream: each document tokenised with the
   model's own tokenizer (no special tokens added) and followed by the EOS token (BOS if the
   tokenizer has no EOS).
4. `windows(stream, seq_len, count, seed)` -> (N, seq_len) non-overlapping windows.
5. `build_calibration_set(...)` does 2-4 for every domain: `num_samples` windows PER DOMAIN,
   chosen at random with a per-domain seed derived from `seed` and the domain name, and a
   sha256 digest of the result so a run can be reproduced and checked.

`default_calibration_sources()` returns the small real-text sets shipped with moecompress
(see calibration/README.md for their sources and licences).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any, Iterator

import torch

from moecompress.errors import MoecompressError

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ".txt, .jsonl, .parquet, or a folder saved with datasets' save_to_disk"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# .txt: a run of two or more blank lines ends a document; single blank lines stay inside it.
TXT_DOCUMENT_BREAK = re.compile(r"\n[ \t\f\v]*\n(?:[ \t\f\v]*\n)+")
FIELD_HINT = "choose the text field with --field"
TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass(frozen=True)
class DomainSource:
    """One named calibration domain read from one local file or dataset folder."""

    name: str  # domain name, e.g. "code"; default = file stem
    path: Path
    field: str = "text"  # column for .jsonl / .parquet / save_to_disk datasets


# ---------------------------------------------------------------------------------------------
# 1. CLI specs -> sources


def _is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _check_source_path(path: Path) -> None:
    """Raise a one-line error unless `path` is an existing file or folder in a supported format."""
    if not path.exists():
        raise MoecompressError(f"calibration data {str(path)!r} does not exist; pass a local {SUPPORTED_FORMATS}")
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise MoecompressError(
                f"folder {str(path)!r} is not a dataset saved with datasets' save_to_disk "
                f"(no state.json or dataset_dict.json); supported: {SUPPORTED_FORMATS}"
            )
        return
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise MoecompressError(
            f"unsupported calibration file {str(path)!r} ({path.suffix or 'no extension'}); supported: {SUPPORTED_FORMATS}"
        )


def _split_spec(value: str) -> tuple[str | None, str]:
    """`"name=path"` -> (name, path); `"path"` -> (None, path). An existing path wins over a split."""
    if "=" in value and not Path(value).exists():
        name, path = value.split("=", 1)
        return name.strip(), path.strip()
    return None, value.strip()


def parse_data_specs(values: list[str], field: str = "text") -> list[DomainSource]:
    """Turn repeatable CLI `--data` values (`"name=path"` or `"path"`) into domain sources.

    A value without a name is named after its file stem (folder name for a saved dataset); an
    explicit name must use letters, digits, '_', '-' or '.'. A value whose whole text is an
    existing path is a path even if it contains '='.
    `field` is the text column for .jsonl, .parquet and saved datasets. An empty list gives an
    empty list (callers then use `default_calibration_sources()`). Duplicate names, missing
    paths and unsupported formats raise `MoecompressError`.
    """
    sources: list[DomainSource] = []
    seen: dict[str, str] = {}
    for value in values:
        name, raw_path = _split_spec(value)
        if not raw_path:
            raise MoecompressError(f"--data {value!r} has no path; use name=path or path")
        path = Path(raw_path).expanduser()
        if name is None:  # named after the file: any file name is accepted
            name = path.stem if path.is_file() else path.name
        elif not DOMAIN_NAME.match(name):
            raise MoecompressError(
                f"invalid domain name {name!r} in --data {value!r}; use letters, digits, '_', '-' or '.', "
                "e.g. --data code=train.jsonl"
            )
        _check_source_path(path)
        if name in seen:
            raise MoecompressError(
                f"domain name {name!r} is used twice ({seen[name]!r} and {value!r}); "
                "give each --data a distinct name with name=path"
            )
        seen[name] = value
        sources.append(DomainSource(name=name, path=path, field=field))
    return sources


# ---------------------------------------------------------------------------------------------
# 2. Sources -> documents


def _read_utf8(path: Path) -> str:
    """The file's text as UTF-8, newlines normalised to \\n."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MoecompressError(f"{str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_txt(path: Path) -> list[str]:
    """Documents of a .txt file: split at runs of two or more blank lines; a file without such a run is one document."""
    parts = TXT_DOCUMENT_BREAK.split(_read_utf8(path))
    return [part.strip("\n").rstrip() for part in parts if part.strip()]


def _text_value(value: Any, where: str, field: str) -> str | None:
    """A record's text, None for null; a non-string value is a user error."""
    if value is None or isinstance(value, str):
        return value
    raise MoecompressError(f"{where}: field {field!r} holds a {type(value).__name__}, not text; {FIELD_HINT}")


def _read_jsonl(path: Path, field: str) -> list[str]:
    """Documents of a .jsonl file: the string `field` of each JSON object, one object per line."""
    texts: list[str] = []
    for number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MoecompressError(f"{where} is not valid JSON ({err.msg}); .jsonl needs one JSON object per line") from None
        if not isinstance(record, dict):
            raise MoecompressError(f"{where} is a JSON {type(record).__name__}, not an object; .jsonl needs one object per line")
        if field not in record:
            seen = ", ".join(sorted(record)) or "none"
            raise MoecompressError(f"{where} has no field {field!r} (fields seen: {seen}); {FIELD_HINT}")
        text = _text_value(record[field], where, field)
        if text and text.strip():
            texts.append(text)
    return texts


def _column_texts(column: list[Any], where: str, field: str) -> list[str]:
    """Non-empty strings of a column, with a clear error for non-text values."""
    texts = []
    for value in column:
        text = _text_value(value, where, field)
        if text and text.strip():
            texts.append(text)
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    """Documents of a .parquet file: its `field` column (read with pyarrow, no cache files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise MoecompressError(f"{str(path)!r} is not a readable parquet file ({err})") from None
    if field not in schema.names:
        raise MoecompressError(f"{path.name} has no column {field!r} (columns: {', '.join(schema.names)}); {FIELD_HINT}")
    column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return _column_texts(column, path.name, field)


def _read_saved_dataset(path: Path, field: str) -> list[str]:
    """Documents of a `save_to_disk` folder: Dataset, or DatasetDict's "train" split or its only split."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    where = path.name
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise MoecompressError(
                f"dataset {str(path)!r} has splits {', '.join(splits)} and no 'train'; "
                f"pass one split's folder, e.g. --data {path / splits[0]}"
            )
        loaded, where = loaded[split], f"{path.name}[{split}]"
    if field not in loaded.column_names:
        raise MoecompressError(f"dataset {where} has no column {field!r} (columns: {', '.join(loaded.column_names)}); {FIELD_HINT}")
    return _column_texts(loaded[field], where, field)


def read_texts(source: DomainSource) -> list[str]:
    """The documents of one source, in file order.

    * `.txt`: UTF-8; documents are separated by two or more consecutive blank lines (a single
      blank line, e.g. between paragraphs, stays inside a document); a file without such a
      break is one document.
    * `.jsonl`: one JSON object per line; the document is its `source.field` string.
    * `.parquet`: the `source.field` column.
    * a `save_to_disk` folder: a Dataset, or a DatasetDict's "train" split (or its only split);
      the `source.field` column.

    Empty and null documents are skipped; a source without any text raises `MoecompressError`.
    """
    path = Path(source.path)
    _check_source_path(path)
    if path.is_dir():
        texts = _read_saved_dataset(path, source.field)
    elif path.suffix.lower() == ".txt":
        texts = _read_txt(path)
    elif path.suffix.lower() == ".jsonl":
        texts = _read_jsonl(path, source.field)
    else:
        texts = _read_parquet(path, source.field)
    if not texts:
        raise MoecompressError(f"domain {source.name!r}: {str(path)!r} holds no text; give it at least one non-empty document")
    return texts


# ---------------------------------------------------------------------------------------------
# 3. Documents -> one token stream


def _separator_id(tokenizer: Any) -> int:
    """The token placed after every document: EOS, or BOS when the tokenizer has no EOS."""
    for token_id in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise MoecompressError("the tokenizer has neither an EOS nor a BOS token to separate documents; set eos_token in tokenizer_config.json")


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents as one (L,) LongTensor: doc_1 SEP doc_2 SEP ... doc_n SEP.

    Each document is tokenised with the model's own tokenizer without special tokens; SEP is
    the EOS token id (BOS if there is no EOS).
    """
    from tqdm.auto import tqdm

    separator = _separator_id(tokenizer)
    chunks: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)]
    batches = range(0, len(texts), TOKENIZE_BATCH)
    for start in tqdm(batches, desc="tokenising", unit="batch", disable=len(batches) < 8, leave=False):
        encoded = tokenizer(texts[start : start + TOKENIZE_BATCH], add_special_tokens=False, verbose=False)
        ids = [token for document in encoded["input_ids"] for token in (*document, separator)]
        chunks.append(torch.tensor(ids, dtype=torch.long))
    return torch.cat(chunks)  # (L,)


# ---------------------------------------------------------------------------------------------
# 4. Stream -> windows


def windows(stream: torch.Tensor, seq_len: int, count: int | None = None, seed: int | None = None) -> torch.Tensor:
    """(N, seq_len) non-overlapping windows cut from a (L,) token stream.

    The stream is cut into L // seq_len consecutive windows (the tail is dropped). `count=None`
    takes all of them; otherwise `seed=None` takes the first `count` in order and an integer
    `seed` takes a seeded random choice of `count` distinct windows (returned in stream order).
    Too little text raises `MoecompressError` with the token counts.
    """
    if stream.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(stream.shape)}")
    if seq_len < 1:
        raise MoecompressError(f"sequence length must be at least 1, got {seq_len}")
    if count is not None and count < 1:
        raise MoecompressError(f"number of samples must be at least 1, got {count}")
    available = stream.numel() // seq_len
    wanted = available if count is None else count
    if available == 0 or wanted > available:
        need = max(wanted, 1) * seq_len
        raise MoecompressError(
            f"the data has {stream.numel()} tokens, {available} window(s) of {seq_len}; "
            f"{max(wanted, 1)} window(s) need {need} tokens: add text, or lower the sample count or sequence length"
        )
    all_windows = stream[: available * seq_len].view(available, seq_len)  # (available, S)
    if seed is None:
        return all_windows[:wanted].clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:wanted].sort().values  # (wanted,)
    return all_windows[chosen].clone()  # (wanted, S)


# ---------------------------------------------------------------------------------------------
# 5. The calibration set


@dataclass
class CalibrationSet:
    """Token windows of every domain, with the record needed to reproduce them."""

    input_ids: torch.Tensor  # (N, S)
    domain_ids: torch.Tensor  # (N,) index into `domains`
    domains: list[str]
    seq_len: int
    seed: int
    digest: str  # sha256 hex over domain names + token ids (reproducibility record)
    sources: list[dict] = dataclass_field(default_factory=list)  # per domain: name, path, field, num_texts, num_tokens, num_samples

    @property
    def num_tokens(self) -> int:
        """Calibration tokens in all windows."""
        return int(self.input_ids.numel())

    def domain_batches(self, batch_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(domain, (B, S)) batches in domain order; every batch comes from one domain, the last of a domain may be smaller."""
        if batch_size < 1:
            raise MoecompressError(f"batch size must be at least 1, got {batch_size}")
        for index, name in enumerate(self.domains):
            rows = self.input_ids[self.domain_ids == index]  # (N_d, S)
            for start in range(0, rows.shape[0], batch_size):
                yield name, rows[start : start + batch_size]

    def record(self) -> dict:
        """A JSON-ready summary for statistics headers: digest, shape, seed and per-domain sources."""
        return {
            "digest": self.digest,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_samples": int(self.input_ids.shape[0]),
            "num_tokens": self.num_tokens,
            "domains": list(self.domains),
            "sources": [dict(source) for source in self.sources],
        }


def calibration_digest(domains: list[str], domain_windows: list[torch.Tensor]) -> str:
    """sha256 hex over each domain's name, its windows' shape and token ids, in domain order."""
    digest = hashlib.sha256()
    for name, rows in zip(domains, domain_windows):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(("%dx%d\0" % tuple(rows.shape)).encode("ascii"))
        digest.update(rows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def domain_seed(seed: int, name: str) -> int:
    """A per-domain seed from the run seed and the domain name (independent of domain order)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


def build_calibration_set(
    tokenizer: Any, sources: list[DomainSource], num_samples: int, seq_len: int, seed: int
) -> CalibrationSet:
    """Read, tokenise and window every source: `num_samples` windows of `seq_len` tokens PER DOMAIN.

    Each domain's windows are a seeded random choice (seed = `domain_seed(seed, name)`) among
    its non-overlapping windows, so adding or reordering domains does not change another
    domain's samples. A domain with too little text raises `MoecompressError`.
    """
    if not sources:
        raise MoecompressError("no calibration data; pass --data name=path (or use the shipped sets)")
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MoecompressError(f"domain name(s) {', '.join(duplicates)} used twice; give each source a distinct name")
    domain_windows: list[torch.Tensor] = []
    records: list[dict] = []
    for source in sources:
        texts = read_texts(source)
        stream = token_stream(tokenizer, texts)  # (L,)
        try:
            rows = windows(stream, seq_len, num_samples, seed=domain_seed(seed, source.name))  # (num_samples, S)
        except MoecompressError as err:
            raise MoecompressError(f"domain {source.name!r} ({source.path}): {err}") from None
        log.info("domain %s: %d documents, %d tokens, %d windows of %d", source.name, len(texts), stream.numel(), num_samples, seq_len)
        domain_windows.append(rows)
        records.append(
            {
                "name": source.name,
                "path": str(source.path),
                "field": source.field,
                "num_texts": len(texts),
                "num_tokens": int(stream.numel()),
                "num_samples": int(rows.shape[0]),
            }
        )
    input_ids = torch.cat(domain_windows)  # (N, S)
    domain_ids = torch.cat([torch.full((rows.shape[0],), index, dtype=torch.long) for index, rows in enumerate(domain_windows)])  # (N,)
    return CalibrationSet(
        input_ids=input_ids,
        domain_ids=domain_ids,
        domains=names,
        seq_len=seq_len,
        seed=seed,
        digest=calibration_digest(names, domain_windows),
        sources=records,
    )


# ---------------------------------------------------------------------------------------------
# Shipped sets


def shipped_calibration_dirs() -> list[Path]:
    """Where the shipped sets may live, preferred first: the installed package copy, then the repo's calibration/."""
    package_root = Path(__file__).resolve().parents[1]  # moecompress/
    return [package_root / "example" / "calibration", package_root.parent / "calibration"]


def default_calibration_sources() -> list[DomainSource]:
    """The small real-text sets shipped with moecompress, one domain per .jsonl file (name = file stem, sorted)."""
    for folder in shipped_calibration_dirs():
        files = sorted(folder.glob("*.jsonl"))
        if files and (folder / "MANIFEST.json").is_file():  # MANIFEST.json marks a folder written by build_sets.py
            return [DomainSource(name=path.stem, path=path, field="text") for path in files]
    searched = " or ".join(str(folder) for folder in shipped_calibration_dirs())
    raise MoecompressError(f"the shipped calibration sets are missing (looked in {searched}); reinstall moecompress or pass --data")
