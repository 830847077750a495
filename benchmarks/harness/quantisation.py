"""Suite ``quantisation``: uniform, mixed-precision and joint prune+quant checkpoints of each fixture.

Rows per fixture, every one quantised by moecompress's own library, written as a GPTQ
checkpoint into a temporary folder (fake-quant where 1-bit experts are allowed), reopened with
`moecompress.load` and scored on the test windows (perplexity per domain, KL divergence to the
unquantised model's next-token distribution, top-1 agreement; `quant_agreement`):

* the unquantised model;
* uniform RTN and uniform GPTQ at 4, 3 and 2 bits (`quantize_checkpoint`, method "uniform");
* MC-MoE (per-layer programs) and GEMQ (one global Fisher-weighted program) at 3.0, 2.5 and
  2.0 average bits, GPTQ on the chosen widths; candidates {2, 3, 4}, and {1, 2, 3, 4} at 2.0
  (`lp_candidates`); GEMQ also with its candidates simulated by GPTQ on each expert's own
  tokens instead of round-to-nearest (`--sensitivity-quantizer gptq`) at 2.5 bits;
* a random 2/3-bit assignment with the same average bits as MC-MoE at 2.5 (seeded, one run per
  seed in options["seeds"], averaged), GPTQ on the chosen widths: the null model of allocation;
* joint REAP pruning + MC-MoE quantisation (`compress_checkpoint`) with the size on disk of the
  MC-MoE 2.5-bit checkpoint as its budget;
* GPTQModel's own GPTQ at 4 and 3 bits with the same plan (`quant_peer`), timed beside ours.

Shared settings: calibration = the fixture's validation split, `calib_windows` seeded windows
of `seq_len` tokens per domain (the same windows for every method and for GPTQModel); group
size options["group_size"] (default 128: the group size of real checkpoints, i.e. the same
128 weights per scale; at hidden size 128 it is one group per row, 64 for DeepSeek's expert
down projections), symmetric, group-aware column order (GAR, options["group_aware"]; GPTQModel's
default, passed to it explicitly), no act-order, damping 0.01; attention, shared experts and dense
MLPs at 4 bits (RTN rows: RTN there too); routers, norms, embeddings and the output head
unquantised.
"""

from __future__ import annotations

import statistics as pystats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.harness.context import Fixture
from benchmarks.harness.quant_agreement import (
    Reference,
    check_matches_evaluate,
    evaluation_windows,
    reference_pass,
    score,
)
from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite

DEFAULTS: dict[str, Any] = {
    "group_size": 128,
    "group_aware": True,
    "uniform_bits": (4, 3, 2),
    "ordering_bits": (3, 2),  # uniform GPTQ also without reordering here, to measure what the column order buys
    "lp_methods": ("mc-moe", "gemq"),
    "lp_bits": (3.0, 2.5, 2.0),
    "gptq_candidate_bits": (2.5,),  # GEMQ also with GPTQ candidates (--sensitivity-quantizer gptq) at these budgets
    "random_bits": 2.5,  # the LP budget the random 2/3-bit assignment is matched to
    "joint": True,
    "gptqmodel": True,
    "gptqmodel_bits": (4, 3),
    "gptqmodel_loader_check": True,
    "gptqmodel_timeout": 1200,
}
DEFAULT_METHOD = "gemq"  # `quantize`'s default method (QuantizeRequest.method)
PPL_MATCH = 0.01  # "our GPTQ matches GPTQModel": mean perplexity at most 1% above GPTQModel's
INCREASE_RATIO = 1.5  # LP at 2.5 bits: perplexity increase at most 1.5x uniform 3-bit GPTQ's
DEFAULT_KL_RATIO = 1.0  # the default quantize method at 2.5 bits: KL divergence at most uniform 3-bit GPTQ's
_DTYPE_BYTES = {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "I64": 8, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


# ------------------------------------------------------------------------------------------ measuring
def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in a folder's safetensors files, from the headers."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                out[name] = _DTYPE_BYTES[part.get_dtype()] * int(torch.Size(part.get_shape()).numel())
    return out


def expert_storage_bits(folder: Path) -> float:
    """Bits on disk per routed-expert weight of a GPTQ folder (codes, scales, zeros, g_idx, biases)."""
    from moecompress.quant.plan import EXPERT_PROJECTIONS, PLAN_FILE, QuantPlan

    plan = QuantPlan.model_validate_json((Path(folder) / PLAN_FILE).read_text())
    experts = {key: entry.params for key, entry in plan.entries.items() if entry.kind == "expert"}
    prefixes = tuple(f"{key}.{proj}." for key in experts for proj in EXPERT_PROJECTIONS)
    stored = sum(size for name, size in tensor_bytes(folder).items() if name.startswith(prefixes))
    return 8 * stored / sum(experts.values())


class FixtureRun:
    """One fixture's shared state: the reference distribution, the request defaults, the work folder."""

    def __init__(self, fixture: Fixture, options: dict[str, Any], workdir: Path) -> None:
        from moecompress.io.checkpoint import folder_bytes
        from moecompress.quant.settings import QuantSettings

        self.fixture = fixture
        self.options = options
        self.workdir = workdir
        self.settings = QuantSettings(group_size=options["group_size"], group_aware=options["group_aware"])
        self.parameters = sum(p.numel() for p in fixture.model.parameters())
        self.source_bytes = folder_bytes(fixture.folder)
        self.element_size = self._dtype().itemsize
        windows = evaluation_windows(fixture)
        self.reference: Reference = reference_pass(fixture.model, windows, fixture.protocol.batch_size)
        self.base = score(fixture.model, self.reference)
        check_matches_evaluate(self.base, fixture.unpruned)
        self.count = 0

    def request(self, **values: Any) -> Any:
        """A validated `QuantizeRequest` with the protocol's calibration and the suite's grid."""
        from moecompress.quant.run import parse_request

        protocol = self.fixture.protocol
        settings = values.pop("settings", {})
        values.setdefault("format", "gptq")
        return parse_request(samples=protocol.calib_windows, seq_len=protocol.seq_len, seed=protocol.calib_seed,
                             batch_size=protocol.batch_size, settings=self.settings.model_copy(update=settings),
                             **values)

    def output(self, name: str) -> Path:
        """A fresh output path inside the work folder."""
        self.count += 1
        return self.workdir / f"{self.count:02d}-{name}"

    def measure(self, folder: Path, seconds: float, cpu_seconds: float) -> dict[str, Any]:
        """Reopen a quantised folder with `moecompress.load` and score it; sizes from the files.

        GPTQ folders: bytes and effective bits measured on disk. Fake-quant folders (1-bit
        candidates, which the GPTQ format cannot store): the library's size model of the packed
        layout (`size_model_bytes`) and the manifest's planned effective bits.
        """
        import moecompress
        from moecompress.io.checkpoint import folder_bytes
        from moecompress.io.manifest import read_manifest
        from moecompress.loader import checkpoint_kind
        from moecompress.quant.plan import PLAN_FILE, QuantPlan

        model = moecompress.load(folder)
        result = score(model, self.reference)
        plan = QuantPlan.model_validate_json((folder / PLAN_FILE).read_text())
        packed = checkpoint_kind(folder) == "gptq"
        modelled = self.size_model_bytes(plan)
        size = folder_bytes(folder) if packed else modelled
        effective = (expert_storage_bits(folder) if packed
                     else read_manifest(folder)["effective_bits_per_parameter"]["routed_experts"])
        return {
            "format": "gptq" if packed else "fake",
            "expert_bits": plan.average_expert_bits(),
            "expert_effective_bits": effective,
            "bytes": size,
            "size_model_bytes": modelled,
            "model_bits": 8 * size / self.parameters,
            "perplexity": {d["domain"]: d["perplexity"] for d in result["domains"]},
            "mean_perplexity": result["mean_perplexity"],
            "kl": result["kl"],
            "top1": result["top1"],
            "kl_per_domain": {d["domain"]: d["kl"] for d in result["domains"]},
            "top1_per_domain": {d["domain"]: d["top1"] for d in result["domains"]},
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "histogram": _histogram(plan.expert_bits()),
        }

    def size_model_bytes(self, plan: Any) -> float:
        """Bytes of `plan` as a GPTQ checkpoint by the library's size model (`moecompress.quant.budget`)."""
        from moecompress.quant.budget import expert_sizes, fixed_bytes
        from moecompress.quant.targets import find_targets

        model, adapter = self.fixture.model, self.fixture.adapter
        targets = find_targets(model, adapter)
        chosen = plan.expert_bits()
        widths = sorted({w for layer in chosen.values() for w in layer})
        sizes = expert_sizes(adapter, targets, widths, "bytes", self.settings, self.element_size)  # layer -> (E, C)
        total = fixed_bytes(model, adapter, targets, self.settings, self.element_size)
        for layer, layer_widths in chosen.items():
            total += sum(float(sizes[layer][e, widths.index(w)]) for e, w in enumerate(layer_widths))
        return total

    def _dtype(self) -> torch.dtype:
        """The floating dtype of the fixture's checkpoint (what quantised folders store the rest in)."""
        from moecompress.models.load import inspect_checkpoint
        from moecompress.sizes import checkpoint_dtype

        return checkpoint_dtype(inspect_checkpoint(self.fixture.folder)) or torch.float32

    def unquantised_row(self) -> dict[str, Any]:
        """The unquantised model, stored as it is on disk."""
        dtype = self._dtype()
        bits = 8 * dtype.itemsize
        return {"method": "unquantised", "label": f"unquantised ({str(dtype).removeprefix('torch.')})",
                "expert_bits": bits, "expert_effective_bits": bits, "bytes": self.source_bytes,
                "model_bits": 8 * self.source_bytes / self.parameters,
                "perplexity": {d["domain"]: d["perplexity"] for d in self.base["domains"]},
                "mean_perplexity": self.base["mean_perplexity"], "kl": self.base["kl"], "top1": self.base["top1"]}


def _histogram(widths: dict[int, list[int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer_widths in widths.values():
        for width in layer_widths:
            counts[str(width)] = counts.get(str(width), 0) + 1
    return dict(sorted(counts.items()))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------------------------ methods
def quantise_row(run: FixtureRun, key: str, label: str, target: float, **request: Any) -> dict[str, Any]:
    """`quantize_checkpoint` with `request`, reopened and scored; the row's method is `key`."""
    from moecompress.quant.run import quantize_checkpoint

    out = run.output(key)
    result, seconds, cpu = _timed(lambda: quantize_checkpoint(run.fixture.folder, out, run.request(**request),
                                                              sources=run.fixture.calibration_sources(),
                                                              progress=False))
    row = {"method": key, "label": label, "target_bits": target, **run.measure(out, seconds, cpu),
           "rtn_fallbacks": len(result.fallbacks)}
    if result.allocation is not None:
        row["solver"] = {"name": result.allocation.solver, "status": result.allocation.status,
                         "seconds": result.allocation.seconds}
    row["folder"] = out
    return row


def lp_candidates(bits: float) -> list[int]:
    """Candidate widths of the LP rows: {2, 3, 4} above 2 bits; {1, 2, 3, 4} at 2 bits or less.

    At exactly 2.0 average bits, {2, 3, 4} admits only "every expert at 2 bits" (and no expert
    at 4 bits, which `require_top=1` asks for), so the program has no mixed solution: the
    MC-MoE paper's low budgets use 1-bit experts for the same reason. The GPTQ format cannot
    store 1-bit maps, so those rows are written in the fake-quant format.
    """
    return [2, 3, 4] if bits > 2 else [1, 2, 3, 4]


def random_widths(targets: Any, adapter: Any, average: float, seed: int) -> dict[int, list[int]]:
    """2/3-bit widths: experts in a seeded random order get 3 bits while the average stays <= `average`."""
    from moecompress.quant.targets import expert_params

    experts = [(layer, e, expert_params(adapter, ref)) for layer, ref in sorted(targets.moe.items())
               for e in range(ref.num_experts)]
    total = sum(params for _, _, params in experts)
    spare = (average - 2) * total  # bits left above 2 per weight
    widths = {layer: [2] * ref.num_experts for layer, ref in targets.moe.items()}
    order = torch.randperm(len(experts), generator=torch.Generator().manual_seed(seed)).tolist()
    for index in order:
        layer, e, params = experts[index]
        if params <= spare + 1e-9 * total:
            widths[layer][e] = 3
            spare -= params
    return widths


def quantise_with_widths(folder: Path, output: Path, request: Any, sources: list[Any], method: str,
                         widths_of: Callable[[Any, Any], dict[int, list[int]]]) -> Any:
    """Quantise a checkpoint with widths chosen by `widths_of(targets, adapter)`, through the library's writer."""
    from moecompress.models.load import inspect_checkpoint, load_model, load_tokenizer
    from moecompress.quant.run import QuantizeJob, calibration_batches, write_quantized
    from moecompress.quant.settings import PlanHeader, make_plan
    from moecompress.quant.targets import find_targets
    from moecompress.sizes import checkpoint_dtype

    info = inspect_checkpoint(folder)
    out_dtype = checkpoint_dtype(info) or torch.float32
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(request.seed)
    batches, calib = calibration_batches(sources, request, tokenizer)
    model, adapter = load_model(folder, dtype="float32")
    targets = find_targets(model, adapter)
    widths = widths_of(targets, adapter)
    plan = make_plan(targets, adapter, widths, request.settings,
                     PlanHeader(method, request.widths(), {"bits": request.bits}))
    job = QuantizeJob(folder, info, model, adapter, batches=batches, calib=calib, tokenizer=tokenizer,
                      out_dtype=out_dtype)
    return write_quantized(job, plan, output, request, force=False, progress=False)


def random_row(run: FixtureRun, average: float, seeds: list[int]) -> dict[str, Any]:
    """The random 2/3-bit assignment at `average` bits, one checkpoint per seed, averaged."""
    runs = []
    request = run.request(method="mc-moe", bits=average, candidate_bits=[2, 3])
    for seed in seeds:
        out = run.output(f"random-{seed}")
        _, seconds, cpu = _timed(lambda: quantise_with_widths(
            run.fixture.folder, out, request, run.fixture.calibration_sources(), f"random 2/3 (seed {seed})",
            lambda targets, adapter: random_widths(targets, adapter, average, seed)))
        runs.append({"seed": seed, **run.measure(out, seconds, cpu)})
    domains = list(runs[0]["perplexity"])
    means = [r["mean_perplexity"] for r in runs]
    return {
        "method": "random", "label": f"random 2/3-bit (mean of {len(seeds)} seeds)", "target_bits": average,
        "format": runs[0]["format"],
        **{key: pystats.fmean(r[key] for r in runs)
           for key in ("expert_bits", "expert_effective_bits", "bytes", "size_model_bytes", "model_bits", "kl", "top1",
                       "seconds", "cpu_seconds")},
        "perplexity": {d: pystats.fmean(r["perplexity"][d] for r in runs) for d in domains},
        "mean_perplexity": pystats.fmean(means),
        "mean_perplexity_std": pystats.pstdev(means) if len(means) > 1 else 0.0,
        "per_seed": [{k: r[k] for k in ("seed", "mean_perplexity", "kl", "top1", "expert_bits", "histogram")}
                     for r in runs],
    }


def joint_row(run: FixtureRun, size_bytes: int, reference_label: str) -> dict[str, Any]:
    """REAP pruning + MC-MoE quantisation in one program, within `size_bytes` on disk."""
    from moecompress.compress.joint import JointPruning, compress_checkpoint

    out = run.output("joint")
    request = run.request(method="mc-moe", size=f"{size_bytes}B")
    (result, allocation), seconds, cpu = _timed(lambda: compress_checkpoint(
        run.fixture.folder, out, request, JointPruning(method="reap"), sources=run.fixture.calibration_sources(),
        progress=False))
    kept = {str(layer): sum(1 for w in widths if w != 0) for layer, widths in allocation.widths.items()}
    return {"method": "joint", "label": "joint REAP prune + MC-MoE quant", "target_bits": None,
            "size_budget": size_bytes, "size_of": reference_label, **run.measure(out, seconds, cpu),
            "kept_per_layer": next(iter(kept.values())),
            "experts_per_layer": len(next(iter(allocation.widths.values()))),
            "solver": {"name": allocation.solver, "status": allocation.status, "seconds": allocation.seconds}}


def gptqmodel_rows(run: FixtureRun, ours: dict[int, dict[str, Any]], bits_list: list[int]) -> list[dict[str, Any]]:
    """GPTQModel at each width with our uniform GPTQ plan of that width; a row with `error` when it fails."""
    from moecompress.quant.plan import PLAN_FILE, QuantPlan
    from moecompress.quant.run import calibration_batches
    from benchmarks.harness.quant_peer import (
        describe_with_plan,
        gptqmodel_config,
        loader_agreement,
        plan_mismatches,
        run_worker,
    )

    fixture = run.fixture
    request = run.request(method="uniform", bits=4)
    _, calib = calibration_batches(fixture.calibration_sources(), request, fixture.tokenizer)
    calib_file = run.workdir / "gptqmodel-calibration.pt"
    torch.save(calib.input_ids, calib_file)  # (N, S): the windows our GPTQ calibrates on
    check = torch.stack([rows[0] for rows in run.reference.windows.values()])  # (D, S) first window per domain
    check_file = run.workdir / "gptqmodel-check.pt"
    torch.save(check, check_file)
    runs, plans = [], {}
    for bits in bits_list:
        plans[bits] = QuantPlan.model_validate_json((ours[bits]["folder"] / PLAN_FILE).read_text())
        runs.append({"name": f"gptqmodel-{bits}", "source": str(fixture.folder),
                     "output": str(run.output(f"gptqmodel-{bits}")),
                     "config": gptqmodel_config(plans[bits]), "calibration": str(calib_file),
                     "batch_size": fixture.protocol.batch_size, "dtype": "float32",
                     "check_ids": str(check_file) if run.options["gptqmodel_loader_check"] else None,
                     "check_out": str(run.workdir / f"gptqmodel-{bits}-check.pt")})
    results = run_worker(runs, run.workdir, torch.get_num_threads(), run.options["gptqmodel_timeout"])
    rows = []
    for bits, job in zip(bits_list, runs):
        outcome = results["runs"][job["name"]]
        common = {"method": "gptqmodel", "label": f"GPTQModel {results.get('version') or ''} GPTQ".replace("  ", " "),
                  "target_bits": bits, "config": {k: v for k, v in job["config"].items() if k != "dynamic"},
                  "import_seconds": results.get("import_seconds")}
        if not outcome["ok"]:
            rows.append({**common, "error": outcome["error"]})
            continue
        folder = Path(job["output"])
        problems = plan_mismatches(folder, plans[bits])
        if problems:
            rows.append({**common, "error": f"GPTQModel's checkpoint differs from the plan: {'; '.join(problems[:3])}"
                                            f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}"})
            continue
        describe_with_plan(folder, plans[bits])
        row = {**common, **run.measure(folder, outcome["seconds"], outcome["cpu_seconds"]),
               "quantize_seconds": outcome["quantize_seconds"], "quantize_cpu_seconds": outcome["quantize_cpu_seconds"]}
        if job["check_ids"] and Path(job["check_out"]).is_file():
            import moecompress

            with torch.no_grad():
                mine = torch.log_softmax(moecompress.load(folder)(input_ids=check).logits[:, :-1].float(), dim=-1)
            row["loader_check"] = loader_agreement(mine, torch.load(job["check_out"]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ suite
def fixture_rows(fixture: Fixture, options: dict[str, Any], progress: Any) -> tuple[list[dict[str, Any]], list[dict]]:
    """Every row of one fixture (see the module docstring), and the parts that could not run."""
    from moecompress.errors import MoecompressError
    from benchmarks.harness.quant_peer import gptqmodel_missing

    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moecompress-quant-bench-") as tmp:
        run = FixtureRun(fixture, options, Path(tmp))
        rows = [run.unquantised_row()]
        progress.update()
        gptq: dict[int, dict[str, Any]] = {}
        for bits in options["uniform_bits"]:
            for quantiser in ("rtn", "gptq"):
                row = quantise_row(run, quantiser, f"uniform {quantiser.upper()}", bits, method="uniform", bits=bits,
                                   settings={"method": quantiser})
                rows.append(row)
                if quantiser == "gptq":
                    gptq[bits] = row
                progress.update()
        if options.get("group_aware", False):
            for bits in options.get("ordering_bits", ()):
                rows.append(quantise_row(run, "gptq-no-reorder", "uniform GPTQ, no reordering", bits,
                                         method="uniform", bits=bits, settings={"method": "gptq", "group_aware": False}))
                progress.update()
        lp: dict[tuple[str, float], dict[str, Any]] = {}
        for method in options["lp_methods"]:
            for bits in options["lp_bits"]:
                candidates = lp_candidates(bits)
                row = quantise_row(run, method, f"{'MC-MoE' if method == 'mc-moe' else 'GEMQ'} LP "
                                   f"{{{', '.join(map(str, candidates))}}}", bits, method=method, bits=bits,
                                   candidate_bits=candidates, format="gptq" if min(candidates) > 1 else "fake")
                rows.append(row)
                lp[(method, bits)] = row
                progress.update()
        for bits in options.get("gptq_candidate_bits", ()):
            candidates = lp_candidates(bits)
            rows.append(quantise_row(run, "gemq-gptq", f"GEMQ LP {{{', '.join(map(str, candidates))}}}, GPTQ "
                                     "candidates", bits, method="gemq", bits=bits, candidate_bits=candidates,
                                     sensitivity_quantizer="gptq", format="gptq" if min(candidates) > 1 else "fake"))
            progress.update()
        anchor = lp.get((options["lp_methods"][0], options["random_bits"])) if options["lp_methods"] else None
        if anchor is None:
            skipped.append({"what": "random 2/3-bit and joint rows",
                            "reason": f"no LP row at {options['random_bits']} bits to match"})
        else:
            rows.append(random_row(run, anchor["expert_bits"], list(options["seeds"])))
            progress.update()
            if options["joint"]:
                try:
                    rows.append(joint_row(run, anchor["bytes"], f"{anchor['label']} at {anchor['target_bits']} bits"))
                except MoecompressError as err:
                    skipped.append({"what": "joint prune + quant", "reason": str(err)})
                progress.update()
        if options["gptqmodel"]:
            missing = gptqmodel_missing()
            bits_list = [b for b in options["gptqmodel_bits"] if b in gptq]
            if missing:
                rows += [{"method": "gptqmodel", "label": "GPTQModel GPTQ", "target_bits": b, "error": missing}
                         for b in bits_list]
            elif bits_list:
                rows += gptqmodel_rows(run, gptq, bits_list)
            progress.update()
        else:
            skipped.append({"what": "GPTQModel", "reason": "excluded by the suite options"})
        for row in rows:
            row.pop("folder", None)
            row["fixture"] = fixture.name
        windows = {d["domain"]: d["windows"] for d in run.base["domains"]}
        for row in rows:
            row["windows"] = windows
    return rows, skipped


def _job_count(options: dict[str, Any]) -> int:
    count = 1 + 2 * len(options["uniform_bits"]) + len(options["lp_methods"]) * len(options["lp_bits"])
    count += len(options.get("gptq_candidate_bits", ()))
    count += len(options.get("ordering_bits", ())) if options.get("group_aware", False) else 0
    count += (1 + bool(options["joint"])) if options["lp_methods"] else 0
    return count + bool(options["gptqmodel"])


@suite("quantisation", "Quantisation: uniform, mixed-precision (MC-MoE, GEMQ), joint, and GPTQModel")
def quantisation(fixtures: list[Fixture], options: dict[str, Any]) -> dict[str, Any]:
    """Every quantisation row of every fixture; options override `DEFAULTS` (and give "seeds")."""
    settings = {**DEFAULTS, "seeds": (0, 1, 2), **options}
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    with tqdm(total=_job_count(settings) * len(fixtures), desc="quantisation", unit="run") as progress:
        for fixture in fixtures:
            fixture_rows_, fixture_skipped = fixture_rows(fixture, settings, progress)
            rows += fixture_rows_
            skipped += [{"fixture": fixture.name, **item} for item in fixture_skipped]
    settings_record = {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
    return {"rows": rows, "skipped": skipped, "settings": settings_record}


# ------------------------------------------------------------------------------------------ report
def _fmt(value: float) -> str:
    return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"


def _time(row: dict[str, Any]) -> str:
    return f"{row['seconds']:.1f} s ({row['cpu_seconds']:.1f} s CPU)" if "seconds" in row else ""


def _by(rows: list[dict[str, Any]], method: str, bits: float | None = None) -> dict[str, Any] | None:
    for row in rows:
        if row["method"] == method and (bits is None or row.get("target_bits") == bits) and "error" not in row:
            return row
    return None


def _increase(row: dict[str, Any], base: dict[str, Any]) -> float:
    return row["mean_perplexity"] - base["mean_perplexity"]


def fixture_checks(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """The issue's targets, computed from one fixture's rows."""
    base = _by(rows, "unquantised")
    random = _by(rows, "random")
    gptq3 = _by(rows, "gptq", 3)
    checks = []
    bits = settings["random_bits"]
    for method in settings["lp_methods"]:
        lp = _by(rows, method, bits)
        name = "MC-MoE" if method == "mc-moe" else "GEMQ"
        if lp is None or base is None:
            continue
        if random is not None:
            met = lp["mean_perplexity"] < random["mean_perplexity"]
            checks.append(
                f"{name} at {bits} bits vs random 2/3-bit at the same {random['expert_bits']:.3f} average bits: mean "
                f"perplexity {_fmt(lp['mean_perplexity'])} vs {_fmt(random['mean_perplexity'])} (KL {lp['kl']:.4f} vs "
                f"{random['kl']:.4f}): **{'met' if met else 'not met'}**")
        if gptq3 is not None:
            rise, ref_rise = _increase(lp, base), _increase(gptq3, base)
            met = rise <= INCREASE_RATIO * ref_rise if ref_rise > 0 else rise <= 0
            ratio = f"{rise / ref_rise:.2f}x" if ref_rise > 0 else "undefined (3-bit GPTQ did not raise perplexity)"
            kl_ratio = f"{lp['kl'] / gptq3['kl']:.2f}x" if gptq3["kl"] > 0 else "-"
            checks.append(
                f"{name} at {bits} bits raises mean perplexity by {rise:+.3f}, uniform 3-bit GPTQ by {ref_rise:+.3f}: "
                f"{ratio} (target <= {INCREASE_RATIO}x; KL ratio {kl_ratio}): **{'met' if met else 'not met'}**")
    default = _by(rows, DEFAULT_METHOD, bits)
    if default is not None and gptq3 is not None and gptq3["kl"] > 0:
        ratio = default["kl"] / gptq3["kl"]
        checks.append(
            f"the default method ({DEFAULT_METHOD}) at {bits} bits: KL {default['kl']:.4f} vs uniform 3-bit GPTQ's "
            f"{gptq3['kl']:.4f}: {ratio:.2f}x (target <= {DEFAULT_KL_RATIO:.1f}x): "
            f"**{'met' if ratio <= DEFAULT_KL_RATIO else 'not met'}**")
    variant = _by(rows, "gemq-gptq", bits)
    gemq = _by(rows, "gemq", bits)
    if variant is not None and gemq is not None:
        ratio = f", {variant['kl'] / gptq3['kl']:.2f}x uniform 3-bit GPTQ's" if gptq3 is not None and gptq3["kl"] else ""
        checks.append(
            f"GEMQ at {bits} bits with GPTQ candidates vs round-to-nearest candidates: KL {variant['kl']:.4f} vs "
            f"{gemq['kl']:.4f}{ratio}; mean perplexity {_fmt(variant['mean_perplexity'])} vs "
            f"{_fmt(gemq['mean_perplexity'])} (informative)")
    for row in rows:
        ordered = _by(rows, "gptq", row["target_bits"]) if row["method"] == "gptq-no-reorder" else None
        if ordered is not None:
            checks.append(
                f"group-aware column order at {row['target_bits']:g} bits vs no reordering (uniform GPTQ): KL "
                f"{ordered['kl']:.4f} vs {row['kl']:.4f} ({ordered['kl'] / row['kl'] - 1:+.0%}), mean perplexity "
                f"{_fmt(ordered['mean_perplexity'])} vs {_fmt(row['mean_perplexity'])} (informative)")
    joint, anchor = _by(rows, "joint"), _by(rows, settings["lp_methods"][0], bits) if settings["lp_methods"] else None
    if joint is not None and anchor is not None:
        better = joint["mean_perplexity"] < anchor["mean_perplexity"]
        checks.append(
            f"joint prune+quant ({joint['kept_per_layer']} of {joint['experts_per_layer']} experts kept per layer, "
            f"{joint['bytes']:,} bytes) vs {anchor['label']} at {bits} bits ({anchor['bytes']:,} bytes): "
            "mean perplexity "
            f"{_fmt(joint['mean_perplexity'])} vs {_fmt(anchor['mean_perplexity'])}, KL {joint['kl']:.4f} vs "
            f"{anchor['kl']:.4f} ({'joint better' if better else 'quantisation alone better'}; informative)")
    for row in rows:
        if row["method"] != "gptqmodel":
            continue
        b = row["target_bits"]
        ours = _by(rows, "gptq", b)
        if "error" in row or ours is None:
            checks.append(f"GPTQModel at {b} bits: not measured ({row.get('error', 'no uniform GPTQ row')})")
            continue
        ppl_met = ours["mean_perplexity"] <= (1 + PPL_MATCH) * row["mean_perplexity"]
        time_met = ours["seconds"] <= row["seconds"] and ours["cpu_seconds"] <= row["cpu_seconds"]
        text = (f"our GPTQ vs GPTQModel at {b} bits: mean perplexity {_fmt(ours['mean_perplexity'])} vs "
                f"{_fmt(row['mean_perplexity'])} (KL {ours['kl']:.4f} vs {row['kl']:.4f}; target: at most "
                f"{PPL_MATCH:.0%} above): **{'met' if ppl_met else 'not met'}**; time {ours['seconds']:.1f} s "
                f"({ours['cpu_seconds']:.1f} s CPU) vs {row['seconds']:.1f} s ({row['cpu_seconds']:.1f} s CPU), "
                f"target not slower in either: **{'met' if time_met else 'not met'}**")
        check = row.get("loader_check")
        if check:
            text += (f". GPTQModel's own loader (float16 CPU kernels) and moecompress's agree on the top-1 token for "
                     f"{check['top1']:.1%} of {check['tokens']} tokens (KL {check['kl']:.1e})")
        checks.append(text)
    return checks


def _size_model_note(rows: list[dict[str, Any]]) -> str:
    """How far the size model is from the files on the rows measured both ways."""
    errors = [(row["size_model_bytes"] - row["bytes"]) / row["bytes"] for row in rows
              if row.get("format") == "gptq" and row["method"] not in ("random", "gptqmodel") and "bytes" in row]
    if not errors:
        return "not compared with files in this run"
    return (f"on the GPTQ rows it is {min(errors):+.2%} to {max(errors):+.2%} off the files: "
            "it counts safetensors headers generously")


def _ordering(settings: dict[str, Any]) -> str:
    """How GPTQ ordered columns in this run (results written before the option existed used no reordering)."""
    if settings.get("group_aware", False):
        return ("group-aware column order (GAR: by decreasing Hessian diagonal inside each group, groups by their "
                "largest; GPTQModel's default, passed to it explicitly; g_idx stays sequential), no act-order")
    return "no act-order, no group-aware reordering (GPTQModel: act_group_aware at its default, on)"


@renderer("quantisation")
def render_quantisation(data: dict[str, Any]) -> list[str]:
    """One table per fixture (rows x bits, size, perplexity, KL, top-1, time) and its checks."""
    settings = data["settings"]
    lines = [
        f"GPTQ checkpoints written by moecompress's library and reopened with `moecompress.load`; group size "
        f"{settings['group_size']} (for ours and GPTQModel; at hidden size 128 that is one group per row, the same "
        f"128 weights per scale as real checkpoints), symmetric, {_ordering(settings)}, damping 0.01; attention, shared "
        "experts and dense MLPs at 4 bits (RTN in the RTN rows), routers, norms, embeddings and output head "
        "unquantised. Calibration: the validation windows of the protocol, identical for every method and "
        "GPTQModel. Expert bits: nominal average over routed-expert weights; effective: bits on disk per "
        "routed-expert weight (scales, zeros, g_idx included); bytes: safetensors files; model bits: bytes x 8 / "
        "unquantised parameters. LP rows at 2.0 bits allow 1-bit experts (with {2, 3, 4} only 'all at 2 bits' "
        "fits): the GPTQ format cannot store 1 bit, so they are written fake-quantised and reopened with plain "
        "transformers; their bytes (≈) and effective bits are the library's size model of the packed layout "
        f"({_size_model_note(data['rows'])}). KL: mean per-token KL divergence (nats) from "
        "the unquantised next-token "
        "distribution; top-1: agreement of the most likely next token. Time: wall "
        "clock of the whole quantisation (load, calibrate, quantise, write), CPU time in brackets; GPTQModel's "
        "time excludes importing it (it gets the calibration windows as token ids; ours tokenises the validation "
        "text inside its time). GPTQModel runs in float32, the compute dtype of ours, and so stores unquantised "
        "tensors in float32: for a bfloat16 fixture its files are larger for that reason only. Its checkpoint is "
        "checked against our plan and dequantised by moecompress's loader, so both are scored by the same float32 "
        "forward. Random: mean over seeds "
        f"{', '.join(map(str, settings['seeds']))}; ± is the standard deviation of the mean perplexity.",
        "",
    ]
    by_fixture: dict[str, list[dict[str, Any]]] = {}
    for row in data["rows"]:
        by_fixture.setdefault(row["fixture"], []).append(row)
    for fixture, rows in by_fixture.items():
        base = _by(rows, "unquantised")
        domains = list(base["perplexity"]) if base else []
        windows = ", ".join(f"{d} {n}" for d, n in rows[0]["windows"].items())
        lines += [f"### {fixture}", "", f"Test windows per domain: {windows}.", "",
                  "| method | target bits | expert bits | effective bits | bytes | model bits | "
                  + " | ".join(domains) + " | mean | x unquantised | KL | top-1 | time |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---|"]
        for row in rows:
            target = "" if row.get("target_bits") is None else f"{row['target_bits']:g}"
            if "error" in row:
                lines.append(f"| {row['label']} | {target} | not run: {row['error']} |")
                continue
            label = row["label"]
            if row["method"] == "joint":
                label += f" ({row['kept_per_layer']}/{row['experts_per_layer']} experts kept)"
                target = f"size of {row['size_of']}"
            spread = f" ± {_fmt(row['mean_perplexity_std'])}" if row.get("mean_perplexity_std") else ""
            ratio = row["mean_perplexity"] / base["mean_perplexity"] if base else float("nan")
            lines.append(
                f"| {label} | {target} | {row['expert_bits']:.3g} | {row['expert_effective_bits']:.3g} | "
                f"{'≈' if row.get('format') == 'fake' else ''}{row['bytes']:,.0f} | {row['model_bits']:.2f} | "
                + " | ".join(_fmt(row["perplexity"][d]) for d in domains)
                + f" | **{_fmt(row['mean_perplexity'])}**{spread} | {ratio:.3f} | {row['kl']:.4f} | "
                f"{row['top1']:.1%} | {_time(row)} |")
        lines += ["", "Checks:", ""] + [f"- {check}" for check in fixture_checks(rows, settings)] + [""]
    for item in data.get("skipped", []):
        lines.append(f"- {item['fixture']}: {item['what']} not run ({item['reason']})")
    return lines
