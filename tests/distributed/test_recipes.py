"""`torchrun -m moecompress run RECIPE`: every step over 2 CPU ranks (gloo) against the same recipe in one process.

The data-parallel steps (calibrate, prune, quantize, eval) split their batches; condense and
write run on rank 0 while rank 1 waits; rank 0 alone prepares the run folder and writes run.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moecompress.recipe import run_recipe
from tests.cli_helpers import make_checkpoint, write_two_domains
from tests.distributed.test_data_parallel import _assert_same_quantised, _leftovers, torchrun
from tests.recipes.conftest import write_recipe

pytestmark = pytest.mark.slow  # each test launches torchrun with 2 processes (15-25 s)

RECIPE = """\
version: 1
model: {model}
calibration:
  domains: {{a: {first}, b: {second}}}
  samples: 5
  seq_len: 32
steps:
  - op: calibrate
    batch_size: 2
  - op: prune
    method: reap
    ratio: 0.5
    batch_size: 2
  - op: eval
    windows: 5
    batch_size: 2
  - op: condense
    num_layers: 1
    batch_size: 2
    no_timing: true
  - op: quantize
    bits: 2.5
    batch_size: 2
  - op: write
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    model = make_checkpoint(folder / "model")
    first, second = write_two_domains(folder)
    return write_recipe(folder, RECIPE.format(model=model, first=first, second=second))


@pytest.mark.slow
def test_two_ranks_run_a_recipe_like_one_process(recipe, tmp_path) -> None:
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    run_recipe(recipe, output=single, progress=False)
    run = torchrun(["run", str(recipe), "-o", str(parallel)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: 6 step(s) ran") == 1  # rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "single"] and _leftovers(tmp_path) == []
    one, two = (json.loads((folder / "run.json").read_text()) for folder in (single, parallel))
    assert one["status"] == two["status"] == "done"
    assert [s["op"] for s in one["steps"]] == [s["op"] for s in two["steps"]]
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in parallel.iterdir())
    for step in ("01-prune", "03-condense"):  # the same experts kept, the same condensed layer
        name = "prune_plan.json" if step == "01-prune" else "condense_plan.json"
        plans = [json.loads((folder / step / name).read_text()) for folder in (single, parallel)]
        if step == "03-condense":
            for plan in plans:
                plan.pop("cost", None)
        assert plans[0] == plans[1], step
    evals = [json.loads((folder / "02-eval" / "eval.json").read_text()) for folder in (single, parallel)]
    assert evals[0]["world_size"] == 1 and evals[1]["world_size"] == 2
    assert [d["domain"] for d in evals[0]["domains"]] == [d["domain"] for d in evals[1]["domains"]] == ["a", "b"]
    for a, b in zip(evals[0]["domains"], evals[1]["domains"]):
        assert a["tokens"] == b["tokens"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    _assert_same_quantised(load_file(single / "model" / "model.safetensors"),
                           load_file(parallel / "model" / "model.safetensors"))


def test_resume_under_torchrun_is_refused_in_one_line(recipe, tmp_path) -> None:
    run = torchrun(["run", str(recipe), "-o", str(tmp_path / "run"), "--resume"])
    assert run.returncode != 0
    errors = sorted({line for line in run.stderr.splitlines() if line.startswith("error: ")})
    assert len(errors) == 1 and "--resume continues a run of one process" in errors[0], run.stderr[-2000:]
    assert not (tmp_path / "run").exists()
