"""Regenerate the demo's held-out evaluation text (moecompress/example/eval/), disjoint from calibration.

    python calibration/build_eval_sets.py

* code.jsonl   top-level chunks of standard-library modules NOT used by calibration/code.jsonl;
* prose.jsonl  pydoc help topics NOT used by calibration/prose.jsonl.

Same sources and licence (PSF-2.0) as the calibration sets, about 40 KB each, deterministic for
a given Python version. `moecompress demo` evaluates perplexity on these files, so its
before/after numbers are measured on text that neither calibration nor pruning saw.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_sets import CODE_MODULES, PACKAGE_DIR, python_chunks, utf8_size  # noqa: E402

EVAL_DIR = PACKAGE_DIR.parent / "eval"
EVAL_BYTES = 40_000
EVAL_CODE_MODULES = ("copy", "fnmatch", "glob", "csv", "ipaddress", "shutil", "getopt", "gettext")
assert not set(EVAL_CODE_MODULES) & set(CODE_MODULES)


def held_out_code() -> list[dict]:
    """Whole top-level chunks of EVAL_CODE_MODULES, in order, up to EVAL_BYTES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records, used = [], 0
    for module in EVAL_CODE_MODULES:
        for chunk in python_chunks((stdlib / f"{module}.py").read_text(encoding="utf-8")):
            text = chunk.strip("\n")
            if text and used + utf8_size(text) <= EVAL_BYTES:
                records.append({"source": f"Lib/{module}.py", "text": text})
                used += utf8_size(text)
    return records


def held_out_prose() -> list[dict]:
    """pydoc topics absent from the calibration prose set, in sha256-of-key order, up to EVAL_BYTES."""
    from pydoc_data.topics import topics

    calibration = PACKAGE_DIR / "prose.jsonl"
    used_keys = {json.loads(line)["source"].split(":", 1)[1] for line in calibration.read_text().splitlines() if line}
    records, used = [], 0
    for key in sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest()):
        text = topics[key].strip()
        if key in used_keys or not text or used + utf8_size(text) > EVAL_BYTES:
            continue
        records.append({"source": f"pydoc_data/topics.py:{key}", "text": text})
        used += utf8_size(text)
    return records


def main() -> None:
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    for name, records in (("code", held_out_code()), ("prose", held_out_prose())):
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        (EVAL_DIR / f"{name}.jsonl").write_text(body, encoding="utf-8")
        print(f"{name}: {len(records)} documents, {len(body.encode())} bytes")


if __name__ == "__main__":
    main()
