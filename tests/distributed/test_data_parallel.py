"""Data-parallel calibration: 2 CPU processes under torchrun (gloo) against one process.

Each launch is `python -m torch.distributed.run --nproc-per-node 2 -m moecompress ...` in a
subprocess (about 15 s on a loaded 2-core machine, mostly the two ranks importing torch and
transformers); the single-process runs go through the CLI in-process. Every test here is
marked `slow`: the README's test command leaves them out and `.ci/run` runs them after it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecompress.calibration.stats import RoutingStats
from moecompress.io.provenance import config_hash
from moecompress.io.manifest import read_manifest
from moecompress.models.load import load_config
from tests.cli_helpers import make_checkpoint, run_cli, write_two_domains
from tests.distributed.failing_rank import FAILURE

pytestmark = pytest.mark.slow  # each test launches torchrun with 2 processes (15-25 s)

REPO = Path(__file__).resolve().parents[2]
# 5 windows per domain in batches of 2: 3 batches per domain, 6 in all, split 3 + 3 across the
# ranks with each rank holding batches of both domains (and rank 1 the short one of domain b)
CALIBRATION = ["--samples", "5", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    first, second = write_two_domains(tmp_path_factory.mktemp("data"))
    return ["--data", f"a={first}", "--data", f"b={second}"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], module: str = "moecompress", nproc: int = 2,
             env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC -m MODULE ARGS` on the CPU, from the repository root."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "MOECOMPRESS_FAULT", "MOECOMPRESS_FAULT_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               COLUMNS="120", CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", module, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _leftovers(folder: Path) -> list[str]:
    """Temporary or replaced output folders the atomic writer leaves only when something went wrong."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _assert_close_stats(single: RoutingStats, parallel: RoutingStats) -> None:
    assert sorted(single.tensors) == sorted(parallel.tensors)
    for name, expected in single.tensors.items():
        got = parallel.tensors[name]
        assert got.dtype == expected.dtype == torch.float64 and got.shape == expected.shape, name
        if name.startswith(("count/", "max_act/")):
            assert torch.equal(got, expected), name  # integer sums and maxima are exact
        else:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=name)


def test_two_ranks_calibrate_like_one_process(checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    single_dir, parallel_dir = tmp_path / "single", tmp_path / "parallel"
    args = ["calibrate", str(checkpoint), *data, *CALIBRATION]
    code, _, err = run_cli([*args, "-o", str(single_dir)], monkeypatch, capsys)
    assert code == 0, err
    run = torchrun([*args, "-o", str(parallel_dir)])
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Routing statistics") == 1  # one summary: rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "single"]

    config = load_config(checkpoint)
    single = RoutingStats.load(single_dir, expect_config=config)
    parallel = RoutingStats.load(parallel_dir, expect_config=config)  # passes the same identity check
    _assert_close_stats(single, parallel)
    one = single.header.model_dump(exclude={"created"})
    two = parallel.header.model_dump(exclude={"created"})
    assert one["data"].pop("world_size") == 1 and two["data"].pop("world_size") == 2
    assert one == two  # digest, seed, tokens per layer and domain, mode, versions, ...
    assert parallel.header.config_hash == config_hash(config)
    layer = parallel.header.moe_layers[0]
    assert parallel.get("count", layer).sum() == 2 * 5 * 32 * parallel.header.top_k


def test_a_failing_rank_ends_every_rank_without_output(checkpoint, data, tmp_path) -> None:
    out = tmp_path / "stats"
    run = torchrun(["calibrate", str(checkpoint), *data, *CALIBRATION, "-o", str(out)],
                   module="tests.distributed.failing_rank")
    assert run.returncode != 0
    # rank 1 reports its own error; rank 0, which finished its share, ends with rank 1's message
    assert f"error: {FAILURE}\n" in run.stderr
    assert f"error: {FAILURE} (on rank 1 of 2, while calibrating)" in run.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_bad_argument_fails_on_every_rank(checkpoint, data, tmp_path) -> None:
    out = tmp_path / "stats"
    run = torchrun(["calibrate", str(checkpoint), *data, *CALIBRATION, "--statistic", "bogus", "-o", str(out)])
    assert run.returncode != 0
    assert "error: unknown statistic(s) bogus" in run.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def _one_process_and_two_ranks(args: list[str], summary: str, tmp_path: Path, monkeypatch, capsys
                               ) -> tuple[Path, Path]:
    """`args -o single` in this process and `args -o parallel` over two ranks: (single, parallel) folders.

    Both succeed; the ranks print one summary (rank 0's, which contains `summary`) and write
    exactly one output folder, holding the same files as the single process's.
    """
    single_dir, parallel_dir = tmp_path / "single", tmp_path / "parallel"
    code, _, err = run_cli([*args, "-o", str(single_dir)], monkeypatch, capsys)
    assert code == 0, err
    run = torchrun([*args, "-o", str(parallel_dir)])
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(summary) == 1  # one summary: rank 0's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "single"]  # exactly one output folder
    assert sorted(p.name for p in single_dir.iterdir()) == sorted(p.name for p in parallel_dir.iterdir())
    return single_dir, parallel_dir


@pytest.mark.slow
@pytest.mark.parametrize(("scoring", "merge"), [("one-pass", "none"), ("sequential", "none"), ("one-pass", "cluster")])
def test_two_ranks_prune_the_same_checkpoint(scoring, merge, checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    """The same plan and tensors; with --merge, each rank's mean_output sums are all-reduced before clustering."""
    args = ["prune", str(checkpoint), "--method", "reap", "--ratio", "0.5", "--scoring", scoring, "--merge", merge,
            *data, *CALIBRATION]
    single_dir, parallel_dir = _one_process_and_two_ranks(args, "checkpoint is in", tmp_path, monkeypatch, capsys)
    for name in ("prune_plan.json", "config.json"):
        assert json.loads((single_dir / name).read_text()) == json.loads((parallel_dir / name).read_text()), name
    expected, got = load_file(single_dir / "model.safetensors"), load_file(parallel_dir / "model.safetensors")
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    one, two = read_manifest(single_dir), read_manifest(parallel_dir)
    assert one["plan"] == two["plan"]
    assert one["calibration"]["data_digest"] == two["calibration"]["data_digest"]
    assert one["calibration"]["data"].pop("world_size") == 1 and two["calibration"]["data"].pop("world_size") == 2
    for manifest in (one, two):  # the stats digest covers the header (world size) and the float64 sums
        manifest.pop("created"), manifest["calibration"].pop("stats_digest")
    assert one == two


def _assert_same_quantised(single: dict[str, torch.Tensor], parallel: dict[str, torch.Tensor]) -> None:
    """Equal tensors; the combined Hessians differ from one process's in float rounding only (float64 combination
    of float32 sums), so a GPTQ code may flip where a value sits on a rounding boundary: at most 1 in 1000."""
    assert sorted(single) == sorted(parallel)
    for name, expected in single.items():
        got = parallel[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        if expected.is_floating_point():
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5, msg=name)
        else:
            assert float((got != expected).float().mean()) <= 1e-3, name


@pytest.mark.parametrize("command", [["quantize", "--bits", "2.5"], ["quantize", "--bits", "2.5", "--method", "gemq"],
                                     ["compress", "--size", "60%"]], ids=["quantize", "quantize-gemq", "compress"])
def test_two_ranks_quantize_like_one_process(command, checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    """MC-MoE or GEMQ sensitivity (GEMQ's layer-streamed backward on each rank's batches), GPTQ (and compress's
    statistics) on each rank's share: the same plan, the same tensors."""
    args = [command[0], str(checkpoint), *command[1:], *data, *CALIBRATION]
    single_dir, parallel_dir = _one_process_and_two_ranks(args, "written to", tmp_path, monkeypatch, capsys)
    one, two = read_manifest(single_dir), read_manifest(parallel_dir)
    assert one["expert_bits"] == two["expert_bits"]  # the plan: every expert's width
    assert one.get("pruning", {}).get("keep") == two.get("pruning", {}).get("keep")  # compress: the experts kept
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["calibration"]["digest"] == two["calibration"]["digest"]
    _assert_same_quantised(load_file(single_dir / "model.safetensors"), load_file(parallel_dir / "model.safetensors"))


def test_a_killed_rank_stops_quantize_and_nothing_is_left(checkpoint, data, tmp_path) -> None:
    """Rank 1 dies by SIGKILL after its first quantised layer; rank 0 stops in one line and removes its folder."""
    out = tmp_path / "out"
    run = torchrun(["quantize", str(checkpoint), "--bits", "2.5", *data, *CALIBRATION, "-o", str(out)],
                   env_extra={"MOECOMPRESS_FAULT": "layer-done:quantizing:0", "MOECOMPRESS_FAULT_RANK": "1"})
    assert run.returncode != 0
    assert "Signal 9 (SIGKILL) received" in run.stderr  # the launcher's report names the rank that died
    ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ("another process of this torchrun job" in ours[0]), run.stderr[-3000:]
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
def test_two_ranks_evaluate_like_one_process(streaming, checkpoint, data, tmp_path, monkeypatch, capsys) -> None:
    """eval: each rank scores its share of the windows (5 per domain: 3 + 2), the sums are all-reduced, rank 0 reports."""
    args = ["eval", str(checkpoint), *data, "--seq-len", "32", "--windows", "5", "--batch-size", "2",
            *(["--streaming"] if streaming else [])]
    code, _, err = run_cli([*args, "--json-out", str(tmp_path / "single.json")], monkeypatch, capsys)
    assert code == 0, err
    run = torchrun([*args, "--json-out", str(tmp_path / "parallel.json")])
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Perplexity of") == 1  # one report: rank 0's
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("single", "parallel"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert [(d["domain"], d["tokens"], d["windows"]) for d in one["domains"]] == \
        [(d["domain"], d["tokens"], d["windows"]) for d in two["domains"]]
    for mine, theirs in zip(one["domains"], two["domains"]):
        # the same windows in other batches (float32 matmuls round differently) and summed in another order
        assert theirs["nll"] == pytest.approx(mine["nll"], rel=1e-6)
    assert two["mean_perplexity"] == pytest.approx(one["mean_perplexity"], rel=1e-6)
