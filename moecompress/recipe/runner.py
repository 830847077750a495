"""Run a plan: each step into its folder of the run folder, a manifest after every step, resumable.

    RUN/
      run.json            the manifest: recipe, plan, one record per step (fingerprint, status, seconds, summary)
      00-calibrate/       statistics (stats.safetensors + stats.json)
      01-prune/           a checkpoint (with its moecompress_manifest.json)
      02-eval/eval.json   perplexities
      model/              what a write step wrote (unless it names another output)

A step's fingerprint hashes its resolved values, the fingerprint of what it reads (the
checkpoint of an earlier step, or the input folder's config and file sizes and times), the
statistics it reuses, its data files (sizes and times) and the moecompress version. With
`resume=True` a step whose fingerprint matches the manifest's record and whose folder is
there is skipped; anything downstream of a changed step runs again because its fingerprint
changes too. Statistics are reused from disk exactly as `--stats` reads them.

Under torchrun (`torchrun --nproc-per-node N -m moecompress run RECIPE`) every rank runs the
plan: calibrate, prune, quantize, compress and eval steps split their batches across the ranks
and rank 0 writes their outputs (as the commands do); condense, export-gguf and write steps
run on rank 0 while the others wait; only rank 0 prepares the run folder and writes run.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moecompress.engine import distributed
from moecompress.engine.resume import file_marks, read_json_file, resume_folder, source_fingerprint
from moecompress.errors import MoecompressError
from moecompress.recipe import execute
from moecompress.recipe.errors import RecipeError
from moecompress.recipe.plan import Plan, PlannedStep

RUN_FILE = "run.json"
RUN_VERSION = 1
STEP_FOLDER = re.compile(r"^\d{2,}-[a-z]+$")

# report(event, planned, payload): event is "start", "skip" or "done" (payload: the step's result)
Reporter = Callable[[str, PlannedStep, Any], None]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _data_marks(planned: PlannedStep) -> list[Any]:
    data = getattr(planned.step, "data", None)
    if data is None:
        from moecompress.calibration.data import default_calibration_sources

        paths = [source.path for source in default_calibration_sources()]
    else:
        paths = [Path(spec.split("=", 1)[1]) if "=" in spec and not Path(spec).exists() else Path(spec)
                 for spec in data]
    return [[str(path), file_marks(path) if path.exists() else None] for path in paths]


def step_fingerprints(plan: Plan) -> list[str]:
    """One fingerprint per step (see the module docstring)."""
    from moecompress import __version__

    source = source_fingerprint(plan.source)
    prints: list[str] = []
    for planned in plan.steps:
        stats = getattr(planned.step, "stats", None)
        record = {
            "op": planned.op,
            "values": planned.step.model_dump(mode="json"),
            "input": prints[planned.input_step] if planned.input_step is not None else source,
            "stats": (prints[planned.stats_step] if planned.stats_step is not None
                      else file_marks(Path(stats)) if stats else None),
            "data": _data_marks(planned) if hasattr(planned.step, "data") else None,
            "version": __version__,
        }
        prints.append(hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest())
    return prints


def read_run(run_dir: Path) -> dict[str, Any] | None:
    """The run manifest of a run folder, or None."""
    return read_json_file(run_dir / RUN_FILE)


def _write_run(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace run.json atomically (an interrupted run never leaves half a manifest); rank 0 only under torchrun."""
    if not distributed.is_writer():
        return
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def summary_of(op: str, result: Any) -> dict[str, Any]:
    """A few numbers for the manifest from a step's result."""
    if op == "calibrate":
        header = result.header
        return {"statistics": list(header.statistics), "domains": list(header.domains),
                "data_digest": header.data_digest}
    if op == "prune":
        return {"params_before": result.params_before, "params_after": result.params_after,
                "bytes_after": result.bytes_after, "format": result.format,
                "kept_per_layer": {str(k): len(v) for k, v in result.plan.keep.items()}}
    if op == "condense":
        return {"layers": list(result.plan.layers), "layout": result.layout, "params_before": result.params_before,
                "params_after": result.params_after, "bytes_after": result.bytes_after}
    if op in ("quantize", "compress"):
        return {"format": result.format, "average_bits": result.average_bits, "bytes_before": result.bytes_before,
                "bytes_after": result.bytes_after}
    if op == "eval":
        return {"mean_perplexity": result.mean_perplexity,
                "perplexity": {r.domain: r.perplexity for r in result.results}}
    if op == "export-gguf":
        summary = {"file": str(result.path), "bytes": result.bytes, "arch": result.arch, "type": result.output_type,
                   "types": dict(result.type_counts)}
        if result.allocation is not None:
            summary["bits_per_weight"] = round(result.allocation.bits_per_weight, 4)
        return summary
    if op == "write":
        return {"output": str(result)}
    return {}


def _prepare_run_dir(plan: Plan, resume: bool, force: bool) -> dict[str, Any] | None:
    """Check (and with force, clear) the run folder; the previous manifest when resuming."""
    run_dir = plan.run_dir
    if resume and force:
        raise MoecompressError("pass --resume (continue the run) or --force (start over), not both")
    previous = read_run(run_dir)
    if run_dir.is_file():
        raise MoecompressError(f"run folder {str(run_dir)!r} is a file; choose a folder path")
    if resume:
        if run_dir.is_dir() and any(run_dir.iterdir()) and previous is None:
            raise MoecompressError(f"{run_dir} is not a moecompress run folder (no {RUN_FILE}); drop --resume or "
                                   "choose another output")
        return previous
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise MoecompressError(f"run folder {str(run_dir)!r} is not empty; pass --resume to continue that run or "
                                   "--force to start over")
        shutil.rmtree(run_dir)
    return None


def _done_before(previous: dict[str, Any] | None, planned: PlannedStep, fingerprint: str) -> bool:
    if previous is None:
        return False
    records = {record.get("index"): record for record in previous.get("steps", [])}
    record = records.get(planned.index)
    return (record is not None and record.get("status") == "done" and record.get("fingerprint") == fingerprint
            and record.get("op") == planned.op and planned.destination().exists())


def _previous_writes(previous: dict[str, Any] | None) -> set[str]:
    if previous is None:
        return set()
    return {record["output"] for record in previous.get("steps", []) if record.get("op") == "write"
            and record.get("output")}


def _check_write_destinations(plan: Plan, force: bool, overwritable: set[str]) -> None:
    """Refuse, before any step runs, to replace a non-empty folder this run did not write."""
    for planned in plan.steps:
        target = planned.destination()
        if planned.op != "write" or plan.run_dir in target.parents or force or str(target) in overwritable:
            continue
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            raise plan.error(RecipeError(f"{target} exists and is not empty; pass --force to replace it, or choose "
                                         "another output", planned.where("output")))


def _remove_stale_folders(plan: Plan) -> None:
    """Step folders of an earlier, different plan (e.g. a step was removed)."""
    current = {planned.folder.name for planned in plan.steps}
    for child in plan.run_dir.iterdir():
        if child.is_dir() and STEP_FOLDER.match(child.name) and child.name not in current:
            shutil.rmtree(child)


WRITER_STEPS = ("condense", "export-gguf", "write")  # under torchrun: run on rank 0, the other ranks wait


def _plan_device(plan: Plan) -> str:
    """The device the steps compute on (the process group's backend follows it); one device type per run."""
    devices = {str(getattr(planned.step, "device", "cpu") or "cpu") for planned in plan.steps}
    kinds = {device.split(":")[0] for device in devices}
    if len(kinds) > 1:
        raise MoecompressError(f"under torchrun every step computes on the same kind of device; this recipe uses "
                               f"{', '.join(sorted(devices))}")
    return sorted(devices)[0] if devices else "cpu"


def _execute(planned: PlannedStep, stats_dir: Path | None, replace_write: bool, progress: bool, resume: bool) -> Any:
    """Run one step; `resume`: calibrate, prune, quantize and compress continue from the step's layer checkpoints.

    Under torchrun the condense, export-gguf and write steps run on rank 0 alone (every rank
    gets its result); the others run on every rank, which share their work.
    """
    if planned.op in WRITER_STEPS and distributed.active():
        return distributed.writer_only(lambda: _run_step(planned, stats_dir, replace_write, progress, resume),
                                       f"the {planned.op} step")
    return _run_step(planned, stats_dir, replace_write, progress and distributed.is_writer(), resume)


def _run_step(planned: PlannedStep, stats_dir: Path | None, replace_write: bool, progress: bool, resume: bool) -> Any:
    step, model, output = planned.step, planned.input, planned.folder
    resume = resume and resume_folder(output).is_dir()  # only a step that was interrupted has checkpoints
    if planned.op == "calibrate":
        return execute.run_calibrate(step, model, output, progress, resume)  # type: ignore[arg-type]
    if planned.op == "prune":
        return execute.run_prune(step, model, output, stats_dir, progress, resume)  # type: ignore[arg-type]
    if planned.op == "condense":
        return execute.run_condense(step, model, output, progress)  # type: ignore[arg-type]
    if planned.op == "quantize":
        return execute.run_quantize(step, model, output, progress, resume)  # type: ignore[arg-type]
    if planned.op == "compress":
        return execute.run_compress(step, model, output, stats_dir, progress, resume)  # type: ignore[arg-type]
    if planned.op == "eval":
        return execute.run_eval(step, model, output, progress)  # type: ignore[arg-type]
    if planned.op == "export-gguf":
        return execute.run_export_gguf(step, model, output, progress)  # type: ignore[arg-type]
    if planned.op == "write":
        return execute.run_write(step, model, replace_write)  # type: ignore[arg-type]
    raise AssertionError(planned.op)


def run_plan(plan: Plan, resume: bool = False, force: bool = False, progress: bool = True,
             report: Reporter | None = None) -> dict[str, Any]:
    """Run every step of `plan` in order (see the module docstring); returns the run manifest."""
    if distributed.launched_in_parallel():
        if resume:
            raise MoecompressError("--resume continues a run of one process; under torchrun start the run again "
                                   "with --force, or resume it in one process")
        distributed.initialise(_plan_device(plan))

    def prepare() -> dict[str, Any] | None:
        found = _prepare_run_dir(plan, resume, force)
        _check_write_destinations(plan, force, _previous_writes(found))
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _remove_stale_folders(plan)
        return found

    previous = distributed.writer_only(prepare, "preparing the run folder")  # one process: just `prepare()`
    report = report if distributed.is_writer() else None  # under torchrun rank 0 reports
    overwritable = _previous_writes(previous)
    prints = step_fingerprints(plan)
    manifest: dict[str, Any] = {
        "run_version": RUN_VERSION,
        "recipe_file": str(plan.loaded.file) if plan.loaded.file else None,
        "overrides": [override.text for override in plan.loaded.overrides],
        "plan": plan.to_dict(),
        "started": _now(),
        "status": "running",
        "steps": [],
    }
    from moecompress.io.provenance import library_versions

    manifest["versions"] = library_versions()
    _write_run(plan.run_dir, manifest)
    for planned, fingerprint in zip(plan.steps, prints):
        record: dict[str, Any] = {"index": planned.index, "op": planned.op, "folder": str(planned.destination()),
                                  "fingerprint": fingerprint}
        if planned.op == "write":
            record["output"] = str(planned.destination())
        if resume and _done_before(previous, planned, fingerprint):
            old = next(r for r in previous["steps"] if r.get("index") == planned.index)  # type: ignore[index]
            record.update(status="done", skipped=True, seconds=old.get("seconds"), summary=old.get("summary", {}))
            manifest["steps"].append(record)
            _write_run(plan.run_dir, manifest)
            if report:
                report("skip", planned, None)
            continue
        if report:
            report("start", planned, None)
        stats_dir = (plan.steps[planned.stats_step].folder if planned.stats_step is not None
                     else Path(planned.step.stats) if getattr(planned.step, "stats", None) else None)  # type: ignore[attr-defined]
        replace_write = force or record.get("output") in overwritable
        started = time.perf_counter()
        try:
            result = _execute(planned, stats_dir, replace_write, progress, resume)
        except BaseException as err:
            record.update(status="failed", error=" ".join(str(err).split()) or type(err).__name__,
                          seconds=round(time.perf_counter() - started, 3))
            manifest["steps"].append(record)
            manifest["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            _write_run(plan.run_dir, manifest)
            raise
        record.update(status="done", seconds=round(time.perf_counter() - started, 3),
                      summary=summary_of(planned.op, result))
        manifest["steps"].append(record)
        _write_run(plan.run_dir, manifest)
        if report:
            report("done", planned, result)
    manifest.update(status="done", finished=_now())
    _write_run(plan.run_dir, manifest)
    return manifest
