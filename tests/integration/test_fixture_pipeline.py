"""The fixture builder end to end, in miniature: corpus -> tokenizer -> trained MoE -> reload -> measurements.

Uses the real document collectors (standard library, package READMEs, headers) with tiny
character budgets, a 300-token BPE and a 2-layer, 4-expert Qwen3-MoE trained for a few steps,
so the builder cannot rot without this test failing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.fixtures import paths
from benchmarks.fixtures.build import RECORD, build_fixture
from benchmarks.fixtures.corpus import SPLITS, CorpusSpec, build_corpus, split_of, split_path
from benchmarks.fixtures.specs import MINI

TINY_CORPUS = CorpusSpec(train_chars=20_000, eval_chars=3_000)


@pytest.fixture(scope="module")
def fixtures_root(tmp_path_factory):
    """A miniature fixtures cache with the corpus already built (shared by the tests here)."""
    root = tmp_path_factory.mktemp("fixtures")
    build_corpus(paths.corpus_dir(root), TINY_CORPUS)
    return root


def _ids(folder, domain, split):
    with split_path(folder, domain, split).open() as handle:
        return [json.loads(line)["id"] for line in handle]


def test_code_domain_drops_comments_and_docstrings_but_still_parses():
    from benchmarks.fixtures.corpus import code_only

    source = (
        '"""Module docstring."""\n'
        "import os  # why\n"
        "\n"
        "# a full-line comment\n"
        "def only_doc():\n"
        '    """Nothing else here."""\n'
        "\n"
        "class Thing:\n"
        '    """Thing docs,\n    on two lines."""\n'
        "    x = '# not a comment'\n"
    )
    assert code_only(source) == (
        "import os\n\n"
        "def only_doc():\n"
        "    pass\n\n"
        "class Thing:\n"
        "    x = '# not a comment'"
    )
    assert code_only("def broken(:\n") is None


def test_corpus_is_deterministic_and_splits_are_disjoint(fixtures_root, tmp_path):
    corpus = paths.corpus_dir(fixtures_root)
    first = build_corpus(corpus, TINY_CORPUS)  # reused: same spec, files present
    second = build_corpus(tmp_path, TINY_CORPUS)
    for domain in TINY_CORPUS.domains:
        for split in SPLITS:
            entry = first["domains"][domain]["splits"][split]
            assert entry["documents"] > 0, (domain, split)
            assert entry["sha256"] == second["domains"][domain]["splits"][split]["sha256"]
        keys = {split: set(_ids(corpus, domain, split)) for split in SPLITS}
        assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"] and not keys["valid"] & keys["test"]
        for split, ids in keys.items():
            # The id of a document is its split key, so its hash decides the split it is in.
            assert all(split_of(key, TINY_CORPUS) == split for key in ids)


def test_docstrings_share_the_split_of_their_source_file(fixtures_root):
    corpus = paths.corpus_dir(fixtures_root)
    python_keys = {split: set(_ids(corpus, "python", split)) for split in SPLITS}
    prose_stdlib = {split: {k for k in _ids(corpus, "prose", split) if k.startswith("stdlib/")} for split in SPLITS}
    for split in SPLITS:
        for other in SPLITS:
            if other != split:
                assert not prose_stdlib[split] & python_keys[other]


def test_miniature_fixture_builds_reloads_and_is_reused(fixtures_root):
    record = build_fixture(MINI, root=fixtures_root, corpus_spec=TINY_CORPUS, progress=False)
    folder = paths.model_dir("mini", fixtures_root)

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    assert len(tokenizer) == MINI.vocab_size
    assert tokenizer.decode(tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"

    assert record["training"]["steps"] == MINI.steps
    assert record["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    domains = {entry["domain"]: entry for entry in record["perplexity"]["domains"]}
    assert set(domains) == set(MINI.domains)
    for entry in domains.values():
        assert entry["windows"] == MINI.eval_windows
        # A few steps already beat the uniform guess (perplexity = vocabulary size).
        assert math.isfinite(entry["perplexity"]) and entry["perplexity"] < MINI.vocab_size
    layers = record["usage"]["layers"]
    assert set(layers) == {"0", "1"}
    for entry in layers.values():
        for fractions in entry["usage"].values():
            assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0, abs=1e-3)
    assert (folder / "TRAINING.md").read_text().count("| python |") == 1

    # The saved model reproduces the recorded perplexity when reloaded.
    from benchmarks.fixtures.measure import measure_perplexity

    again = measure_perplexity(model.eval(), tokenizer, paths.corpus_dir(fixtures_root), MINI.domains, MINI.seq_len,
                               MINI.eval_windows)
    assert again["domains"][0]["perplexity"] == pytest.approx(domains["python"]["perplexity"], rel=1e-5)

    # A second build reuses the cached model instead of retraining.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_fixture(MINI, root=fixtures_root, corpus_spec=TINY_CORPUS, progress=False) == json.loads(
        (folder / RECORD).read_text()
    )
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_deepseek_balancing_moves_correction_biases(fixtures_root, tmp_path):
    """The DeepSeek-V3 recipe (sigmoid router, groups, shared expert) trains and updates its biases."""
    from dataclasses import replace

    from benchmarks.fixtures.specs import DEEPSEEK_V3
    from benchmarks.fixtures.tokenizer import train_tokenizer
    from benchmarks.fixtures.train import train_model

    corpus = paths.corpus_dir(fixtures_root)
    tokenizer = train_tokenizer(corpus, tmp_path / "tok", 300, MINI.domains, chars_per_domain=20_000)
    config = dict(DEEPSEEK_V3.config, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8)
    # The fixture itself trains with the bias update off (see specs.py); the update stays tested here.
    spec = replace(DEEPSEEK_V3, name="mini_deepseek", vocab_size=300, config=config, steps=4, batch_size=3,
                   seq_len=32, warmup_steps=1, bias_update_rate=0.001)
    model, log = train_model(spec, tokenizer, corpus, progress=False)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert model.model.layers[0].mlp.__class__.__name__ == "DeepseekV3MLP"  # dense first layer
    assert torch.count_nonzero(bias) > 0
    assert bias.abs().max() <= spec.bias_update_rate * spec.steps + 1e-6
    assert math.isfinite(log.final_loss)


def test_harness_runs_every_suite_on_the_miniature(fixtures_root, tmp_path):
    """benchmarks/run.py end to end on the miniature: raw JSON per suite and RESULTS.md tables (the baseline
    suites; the suites in their own modules have their own tests under tests/benchmarks)."""
    from benchmarks.run import main

    build_fixture(MINI, root=fixtures_root, corpus_spec=TINY_CORPUS, progress=False)
    results = tmp_path / "results"
    main(["--suite", "unpruned", "pruning-baselines", "domain-pruning",
          "--root", str(fixtures_root), "--fixtures", "mini", "--windows", "2", "--seq-len", "32",
          "--calib-windows", "2", "--seeds", "0", "1", "--threads", "1",
          "--results-dir", str(results), "--output", str(tmp_path / "RESULTS.md")])
    baselines = json.loads((results / "pruning-baselines.json").read_text())
    rows = baselines["data"]["rows"]
    assert {(row["ratio"], row["method"].split()[0]) for row in rows} == {
        (0.25, "random"), (0.25, "frequency"), (0.5, "random"), (0.5, "frequency")}
    assert {row["kept_per_layer"] for row in rows} == {3, 2}
    assert [item["ratio"] for item in baselines["data"]["skipped"]] == [0.75]  # 1 expert < top_k = 2
    assert baselines["environment"]["torch"] == torch.__version__
    domain_rows = json.loads((results / "domain-pruning.json").read_text())["data"]["rows"]
    assert [row["calibrated_on"] for row in domain_rows] == ["all domains", *MINI.domains]
    text = (tmp_path / "RESULTS.md").read_text()
    for title in ("Unpruned fixtures", "Pruning baselines", "Domain-specific pruning"):
        assert title in text
    assert "| 50% | 2 | frequency |" in text
