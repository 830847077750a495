"""The ``scale`` suite: moecompress commands at a public model's real layer shapes, under a hard memory cap.

For the spec (default Qwen3-30B-A3B) it builds, or reuses, random-weight checkpoints with a
few decoder layers (`checkpoints.py`) and, for every enabled command of `commands.COMMANDS`:

(a) times it in a fresh child at two depths (default 2 and 8 layers), uncapped but inside its
    own memory cgroup (so its peaks are measured), giving seconds per decoder layer and the
    time extrapolated to the full depth; commands marked `size_sweep` are also timed at every
    sweep depth (default 2, 4, 6, 8) for the exponent b of time ~ size^b;
(b) on the deepest checkpoint, finds the smallest cap among the fractions of the checkpoint's
    size (default 0.15 .. 0.5) under which it succeeds (`cgroup.smallest_cap`), starting from
    the uncapped run's anonymous peak.

Every run starts with the checkpoint's pages dropped from the page cache (`pagecache.evict`):
timings are cold-cache, and capped runs are charged for the pages they read. The trained
fixtures are not used. Settings come from the options dict (keys `scale_*`) or the
environment: MOECOMPRESS_SCALE_SPEC=name (a spec of `specs.SPECS`), MOECOMPRESS_SCALE_QUICK=1
(1- and 2-layer checkpoints only, a smoke run), MOECOMPRESS_SCALE_COMMANDS=label,label (a subset
of the commands), MOECOMPRESS_SCALE_CODE=head (measure the package as committed instead of the
working tree). Either way the package is copied once at the start (`snapshot.freeze`) and every
child imports that copy, so edits made to the checkout during a run of several hours do not
leak into it.

Each spec has its own defaults (`SPEC_SETTINGS`: DeepSeek-V3 in FP8 is measured at 2 and 3
layers, capped at 2, since one of its MoE layers is 10.7 GiB) and its own result file:
`result_key` is ``scale`` for the default spec (Qwen3-30B-A3B) and ``scale-<spec>`` for the
others (``scale-deepseek-v3-fp8``), each rendered as its own RESULTS.md section.
`python -m benchmarks.scale --spec NAME` stores a run under that key; the harness's ``scale``
suite measures the default spec only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.report import renderer
from benchmarks.harness.suites import suite
from benchmarks.scale import fit
from benchmarks.scale.cgroup import CapResult, run_capped, smallest_cap, unavailable_reason
from benchmarks.scale.checkpoints import (cached_checkpoint, checkpoint_bytes, describe_weights, ensure_room,
                                          scale_root)
from benchmarks.scale.commands import COMMANDS, Command
from benchmarks.scale.pagecache import evict
from benchmarks.scale.progress import bar_phases
from benchmarks.scale.snapshot import freeze
from benchmarks.scale.specs import SPECS

REPO = Path(__file__).resolve().parents[2]
GIB = 1024 ** 3
DEFAULT_SPEC = "qwen3_30b_a3b"
SPEC_ENV = "MOECOMPRESS_SCALE_SPEC"
TITLE = "Scale: moecompress commands at real MoE layer shapes under a hard memory cap"


@dataclass(frozen=True)
class Settings:
    """What one run of the suite measures."""

    spec: str = DEFAULT_SPEC
    timing_depths: tuple[int, ...] = (2, 8)
    sweep_depths: tuple[int, ...] = (2, 4, 6, 8)
    cap_depth: int = 8
    fractions: tuple[float, ...] = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    commands: tuple[str, ...] = ()  # labels; empty: every enabled command
    timeout: float = 4 * 3600.0  # uncapped runs
    quick: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # config changes (tests: shrunken shapes)
    code: str = "worktree"  # which moecompress the children run, frozen at the start: "worktree" or "head"
    overridden: tuple[str, ...] = ()  # settings given explicitly (options), which then apply to every command

    @property
    def depths(self) -> list[int]:
        """Every checkpoint depth the suite's own depths need (commands may add theirs: `needed_depths`)."""
        return sorted({*self.timing_depths, *self.sweep_depths, self.cap_depth})


def timing_depths(command: Command, s: Settings) -> tuple[int, ...]:
    """The depths `command` is timed at uncapped: its own (slow commands), else the suite's.

    Quick runs, and runs given their own timing depths (`scale_timing_depths`, `--timing-depths`),
    use the suite's for every command.
    """
    own = command.timing_depths and not s.quick and "timing_depths" not in s.overridden
    return command.timing_depths if own else s.timing_depths


def cap_fractions(command: Command, s: Settings) -> tuple[float, ...]:
    """The caps tried for `command`: its own target caps, else the suite's fractions; quick runs use the suite's."""
    return command.cap_fractions if command.cap_fractions and not s.quick else s.fractions


def needed_depths(commands: Sequence[Command], s: Settings) -> list[int]:
    """Every checkpoint depth the chosen commands need."""
    depths = {s.cap_depth}
    for command in commands:
        depths |= {*timing_depths(command, s), *(s.sweep_depths if command.size_sweep else ())}
    return sorted(depths)


# At 1-2 layers the embeddings and head weigh as much as the layers, so the caps go up to the whole checkpoint.
QUICK = {"timing_depths": (1, 2), "sweep_depths": (1, 2), "cap_depth": 2, "fractions": (0.25, 0.5, 0.75, 1.0),
         "quick": True}

# Defaults per spec, before QUICK and the options. DeepSeek-V3 in FP8: one MoE layer is 10.7 GiB on disk (256 experts
# x 3 x 7168 x 2048 codes), so 2 layers (1 dense + 1 MoE: 14.7 GiB) is what this machine's disk holds beside the
# pruned output and the Qwen3 cache; `prune frequency` (which calibrates first) is the command the formats issue asks
# about, and it is run once under the 0.25x target cap (each attempt takes about 20 minutes on this CPU).
SPEC_SETTINGS: dict[str, dict[str, Any]] = {
    "deepseek_v3_fp8": {"timing_depths": (2,), "sweep_depths": (2,), "cap_depth": 2,
                        "fractions": (0.25,),
                        "commands": ("prune frequency",)},
}


def chosen_spec(options: dict[str, Any]) -> str:
    """The spec to measure: option `scale_spec`, else $MOECOMPRESS_SCALE_SPEC, else the default (Qwen3-30B-A3B)."""
    name = options.get("scale_spec") or os.environ.get(SPEC_ENV) or DEFAULT_SPEC
    if name not in SPECS:
        raise SystemExit(f"unknown scale spec {name!r}; known: {sorted(SPECS)}")
    return name


def result_key(spec: str) -> str:
    """The suite key (results JSON file name) a spec's runs are stored under: `scale`, or `scale-<spec>`."""
    return "scale" if spec == DEFAULT_SPEC else "scale-" + spec.replace("_", "-")


def suite_title(spec: str) -> str:
    """The RESULTS.md section title of a spec's runs (the default spec keeps the suite's title)."""
    return TITLE if spec == DEFAULT_SPEC else f"Scale, {SPECS[spec].title}: {TITLE.split(': ', 1)[1]}"


def settings(options: dict[str, Any]) -> Settings:
    """Settings from `options` (`scale_spec`, `scale_quick`, `scale_commands`, `scale_<field>`) and the environment.

    The spec's `SPEC_SETTINGS` come first, then QUICK, then the options.
    """
    spec = chosen_spec(options)
    values: dict[str, Any] = {"spec": spec, **SPEC_SETTINGS.get(spec, {})}
    quick = options.get("scale_quick", os.environ.get("MOECOMPRESS_SCALE_QUICK", "") not in ("", "0"))
    if quick:
        values.update(QUICK)
    commands = options.get("scale_commands") or [c for c in os.environ.get("MOECOMPRESS_SCALE_COMMANDS", "").split(",")
                                                 if c.strip()]
    if commands:
        values["commands"] = tuple(c.strip() for c in commands)
    values["code"] = options.get("scale_code") or os.environ.get("MOECOMPRESS_SCALE_CODE") or "worktree"
    given = []
    for name in ("timing_depths", "sweep_depths", "cap_depth", "fractions", "timeout", "overrides"):
        if f"scale_{name}" in options:
            value = options[f"scale_{name}"]
            values[name] = tuple(value) if isinstance(value, list | tuple) else value
            given.append(name)
    values["overridden"] = tuple(given)
    chosen = Settings(**values)
    known = {c.label for c in COMMANDS}
    unknown = set(chosen.commands) - known
    if unknown:
        raise SystemExit(f"unknown scale command(s) {sorted(unknown)}; known: {sorted(known)}")
    return chosen


def child_env(code: Path) -> dict[str, str]:
    """The children's environment: offline hub, the frozen package in `code` first on the path."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH", "")) if p)
    return env


def _log(message: str) -> None:
    print(f"[scale] {message}", flush=True)


def _progress(record: dict[str, Any]) -> None:
    """Append one run to $MOECOMPRESS_SCALE_DIR/progress.jsonl (for watching a long run)."""
    root = scale_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "progress.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _communication(out: Path) -> dict[str, int] | None:
    """What rank 0 sent into collectives, from the output's manifest (None: one process, or no manifest)."""
    manifest = out / "moecompress_manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("communication_rank0")


def run_once(command: Command, ckpt: Path, cap_bytes: int | None, timeout: float, code: Path
             ) -> tuple[CapResult, int, dict[str, int] | None]:
    """Run `command` on `ckpt` once, cold-cache, into a fresh output folder deleted after.

    Returns (result, output bytes, rank 0's communication under torchrun). The child runs in
    `code` (the frozen package's folder), so `-m moecompress` imports that copy.
    """
    scratch = Path(tempfile.mkdtemp(prefix="moecompress-scale-"))
    try:
        evict(ckpt)
        result = run_capped(command.argv(ckpt, scratch / "out"), cap_bytes, timeout, cwd=code, env=child_env(code),
                            parse_stderr=bar_phases)
        return result, _folder_bytes(scratch / "out"), _communication(scratch / "out")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def timing_row(command: Command, depth: int, ckpt: Path, size: int, timeout: float, code: Path) -> dict[str, Any]:
    """One uncapped (measured-only) run of `command` at `depth` layers."""
    load_before = os.getloadavg()[0]
    result, out_bytes, communication = run_once(command, ckpt, None, timeout, code)
    row = {"command": command.label, "layers": depth, "checkpoint_bytes": size, "output_bytes": out_bytes,
           "load_before": load_before, "load_after": os.getloadavg()[0], **result.as_dict()}
    if communication is not None:
        row["communication_rank0"] = communication
    _log(f"{command.label} @ {depth} layers: {result.outcome} in {result.seconds:.0f} s "
         f"(cpu {result.cpu_seconds:.0f} s, anon peak {result.peak_rss / GIB:.2f} GiB)")
    _progress({"kind": "timing", **row})
    return row


def fits(command: Command, rows: list[dict[str, Any]], s: Settings, full_layers: int) -> dict[str, Any]:
    """Seconds per layer, the full-depth extrapolation and (sweep commands) the time-size exponent."""
    ok = {row["layers"]: row for row in rows if row["command"] == command.label and row["ok"]}
    out: dict[str, Any] = {"command": command.label}
    shallow, deep = min(timing_depths(command, s)), max(timing_depths(command, s))
    if shallow in ok and deep in ok and shallow != deep:
        for key, column in (("wall", "seconds"), ("cpu", "cpu_seconds")):
            per_layer = fit.seconds_per_layer((shallow, ok[shallow][column]), (deep, ok[deep][column]))
            out[f"{key}_seconds_per_layer"] = per_layer
            out[f"{key}_full_depth_seconds"] = fit.extrapolate((shallow, ok[shallow][column]), per_layer, full_layers)
        out["depths"] = [shallow, deep]
        out["full_layers"] = full_layers
    sweep = [depth for depth in sorted(s.sweep_depths) if depth in ok]
    if command.size_sweep and len(sweep) >= 2:
        exponent, r2 = fit.power_law_exponent([ok[d]["checkpoint_bytes"] for d in sweep],
                                              [ok[d]["seconds"] for d in sweep])
        out.update({"size_exponent": exponent, "size_r2": r2, "sweep_depths": sweep})
    return out


def cap_search(command: Command, ckpt: Path, size: int, hint: dict[str, Any] | None, s: Settings, code: Path
               ) -> dict[str, Any]:
    """The smallest tried cap under which `command` succeeds on `ckpt`, with every attempt."""
    timeout = max(900.0, 3 * hint["seconds"]) if hint else s.timeout

    def runner(argv: Sequence[str], cap: int | None, limit: float) -> CapResult:
        result = run_capped(argv, cap, limit, cwd=code, env=child_env(code), parse_stderr=bar_phases)
        _log(f"{command.label} @ {s.cap_depth} layers, cap {cap / size:.2f}: {result.outcome} in "
             f"{result.seconds:.0f} s (max usage {result.max_usage / GIB:.2f} GiB)")
        _progress({"kind": "cap", "command": command.label, "layers": s.cap_depth, "fraction": cap / size,
                   **result.as_dict()})
        return result

    found = smallest_cap(lambda out: command.argv(ckpt, out), size, cap_fractions(command, s), timeout=timeout,
                         hint_bytes=hint["peak_rss"] if hint else None, runner=runner,
                         before_each=lambda: evict(ckpt))
    return {"command": command.label, "layers": s.cap_depth, "timeout": timeout,
            "fractions": list(cap_fractions(command, s)), **found.as_dict()}


def measure_all(chosen: list[Command], checkpoints: dict[int, dict[str, Any]], s: Settings, code: Path
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """Timing runs of every command, then its cap search: (timings, caps, why caps are not measured)."""
    timings: list[dict[str, Any]] = []
    caps: list[dict[str, Any]] = []
    cap_reason = unavailable_reason()
    for command in chosen:
        depths = sorted({*timing_depths(command, s), *(s.sweep_depths if command.size_sweep else ())})
        for depth in depths:
            info = checkpoints[depth]
            timings.append(timing_row(command, depth, Path(info["path"]), info["bytes"], s.timeout, code))
        if cap_reason is None and not command.capped:
            caps.append({"command": command.label, "layers": s.cap_depth, "fraction": None, "attempts": [],
                         "skipped": "timed only"})
        elif cap_reason is None:
            hint = next((row for row in timings if row["command"] == command.label and row["layers"] == s.cap_depth
                         and row["ok"]), None)
            if hint is None and command.cap_fractions and not s.quick:
                # its target caps are tried directly at the cap depth (the capped run is its time there)
                caps.append({**cap_search(command, Path(checkpoints[s.cap_depth]["path"]),
                                          checkpoints[s.cap_depth]["bytes"], None, s, code), "direct": True})
                continue
            if hint is None and s.cap_depth not in depths:
                info = checkpoints[s.cap_depth]
                timings.append(timing_row(command, s.cap_depth, Path(info["path"]), info["bytes"], s.timeout, code))
                hint = timings[-1] if timings[-1]["ok"] else None
            if hint is None:
                caps.append({"command": command.label, "layers": s.cap_depth, "fraction": None, "attempts": [],
                             "skipped": "the uncapped run failed, so no cap can succeed"})
            else:
                caps.append(cap_search(command, Path(checkpoints[s.cap_depth]["path"]),
                                       checkpoints[s.cap_depth]["bytes"], hint, s, code))
    return timings, caps, cap_reason


@suite("scale", TITLE)
def scale(fixtures: list[Any], options: dict[str, Any]) -> dict[str, Any]:
    """Time and cap every enabled command on real-shape random checkpoints of the default spec (fixtures ignored).

    The harness stores this suite as `scale.json`, so another spec is refused here: measure it
    with `python -m benchmarks.scale --spec NAME`, which stores it under its own key.
    """
    del fixtures  # random-weight checkpoints at real shapes; the trained fixtures play no part
    s = settings(options)
    if result_key(s.spec) != "scale":
        raise SystemExit(f"the scale suite measures {DEFAULT_SPEC} (stored as scale.json); for {s.spec} run "
                         f"`python -m benchmarks.scale --spec {s.spec}`, stored as {result_key(s.spec)}.json")
    return measure(s)


def measure(s: Settings) -> dict[str, Any]:
    """Build the checkpoints `s` needs, then time and cap each chosen command on them: the suite's data."""
    spec = SPECS[s.spec]
    chosen = [c for c in COMMANDS if c.enabled and (not s.commands or c.label in s.commands)]
    pending = [{"command": c.label, "text": c.text(), "note": c.note} for c in COMMANDS if not c.enabled]
    checkpoints = {}
    depths = needed_depths(chosen, s)
    ensure_room(spec, depths, s.overrides or None)  # before the first build, not after hours of them
    for depth in depths:
        _log(f"checkpoint {spec.name} @ {depth} layers")
        folder, record = cached_checkpoint(spec, depth, overrides=s.overrides or None)
        checkpoints[depth] = {"path": str(folder), "bytes": checkpoint_bytes(folder), "weights": record.get("weights"),
                              **{k: record[k] for k in ("layers", "parameters", "tensors", "shards", "seconds")}}
    with tempfile.TemporaryDirectory(prefix="moecompress-scale-code-") as frozen:
        code = freeze(REPO, Path(frozen), s.code)
        _log(f"measuring moecompress {code['source']} at {code['commit']} (frozen copy in {frozen})")
        _progress({"kind": "start", "code": code, "commands": [c.label for c in chosen]})  # for `recover`
        timings, caps, cap_reason = measure_all(chosen, checkpoints, s, Path(frozen))
    return _data(s, spec, checkpoints, chosen, pending, timings, caps, cap_reason, code)


def _data(s: Settings, spec: Any, checkpoints: dict[int, dict[str, Any]], chosen: list[Command],
          pending: list[dict[str, Any]], timings: list[dict[str, Any]], caps: list[dict[str, Any]],
          cap_reason: str | None, code: dict[str, Any]) -> dict[str, Any]:
    """The suite's data, as stored and rendered."""
    return {
        "settings": asdict(s),
        "spec": {"name": spec.name, "title": spec.title, "full_layers": spec.full_layers,
                 "config": spec.config_dict(spec.full_layers, s.overrides or None),
                 "weights": describe_weights(spec.config_dict(spec.full_layers, s.overrides or None))},
        "checkpoints": {str(k): v for k, v in checkpoints.items()},
        "commands": [{"command": c.label, "text": c.text(), "size_sweep": c.size_sweep} for c in chosen],
        "pending": pending,
        "timings": timings,
        "fits": [fits(c, timings, s, spec.full_layers) for c in chosen],
        "caps": caps,
        "cap_unavailable": cap_reason,
        "cpus": os.cpu_count(),
        "code": code,
    }


# ---------------------------------------------------------------------------------------------- rendering


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _size(value: float) -> str:
    """Bytes in MiB below 1 GiB, GiB above."""
    return f"{value / 1024 ** 2:.1f} MiB" if value < GIB else _gib(value)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _layer_pass(row: dict[str, Any]) -> str:
    """The command's own layer-pass time (its progress bar), when it printed one."""
    phases = row.get("parsed", {}).get("phases", {})
    bar = phases.get("calibrating")
    return "-" if not bar else f"{bar['seconds']} s ({bar['seconds'] / max(1, bar['done']):.0f} s/layer)"


def _weights_phrase(spec: dict[str, Any]) -> tuple[str, str]:
    """(how the protocol sentence opens, a sentence on the storage or ""); results without `weights` are bf16."""
    weights = spec.get("weights") or "bf16"
    if weights == "bf16":
        return "Random bf16 weights (N(0, 0.02), norms 1) at the real layer shapes and on-disk tensor names", ""
    return ("Random weights at the real layer shapes, on-disk tensor names and storage",
            f" Storage as published: {weights} for every linear weight of the decoder layers (float8 codes "
            "N(0, 16), a float32 `<name>_scale_inv` per block of 0.02 / 16 x U(0.5, 1.5), so the dequantised "
            "weights are about N(0, 0.02)); embeddings, head, norms and router in bf16 (N(0, 0.02), norms 1), the "
            "router's correction bias in float32.")


def _dense_phrase(config: dict[str, Any]) -> str:
    """DeepSeek-style leading dense layers: what a shallow checkpoint keeps of them."""
    dense = config.get("first_k_dense_replace")
    if not dense:
        return ""
    return (f"; the model's first {dense} layers are dense, a shallow checkpoint keeps one dense layer and makes "
            "the rest MoE layers")


@renderer("scale")
def render_scale(data: dict[str, Any]) -> list[str]:
    """Protocol sentence, checkpoints, timings and fits, smallest caps, pending commands and failures."""
    spec, s = data["spec"], data["settings"]
    config = spec["config"]
    code = data.get("code")
    measured = (f"moecompress {'as committed at' if code['source'] == 'head' else 'working tree at'} "
                f"{code['commit']}, copied once at the start so that every run measures the same code. "
                if code else "")
    opening, storage = _weights_phrase(spec)
    lines = [
        f"Protocol: {measured}{opening} of {spec['title']} (published config: hidden {config.get('hidden_size')}, "
        f"{config.get('num_experts', config.get('n_routed_experts', config.get('num_local_experts')))} experts of "
        f"width {config.get('moe_intermediate_size', config.get('intermediate_size'))}, top-"
        f"{config.get('num_experts_per_tok')}, vocabulary {config.get('vocab_size')}) with only the first few of its "
        f"{spec['full_layers']} decoder layers{_dense_phrase(config)}.{storage} Each command runs as "
        f"`python -m moecompress` in a fresh child on {data['cpus']} CPUs, with the checkpoint's pages dropped from "
        "the page cache first (cold start), inside its "
        "own cgroup-v1 memory group: uncapped for timing, then under a hard `memory.limit_in_bytes` (swap capped "
        "too). Under the cap the kernel reclaims page cache (the memory-mapped checkpoint) but never anonymous "
        "memory, so a command that exits 0 under a cap fits in that much RAM; one that does not is OOM-killed (a "
        "capped run that takes longer than max(15 min, 3x its uncapped time) is stopped and counts as not fitting). "
        "Random weights give near-uniform routing; quality numbers are not the point, costs are. Calibration data: "
        "the shipped sets (code, docs, prose), 8 windows of 256 tokens each.", ""]
    if s.get("quick"):
        lines += ["**Quick (smoke) run**: shallow checkpoints only; the extrapolation is rough.", ""]
    if data.get("recovered"):
        lines += ["This run was stopped before its last command finished; its finished measurements were recovered "
                  "from the suite's progress records (`python -m benchmarks.scale --recover`).", ""]
    lines += ["| checkpoint | parameters | on disk | build |", "|---|---:|---:|---:|"]
    for depth, info in data["checkpoints"].items():
        lines.append(f"| {depth} decoder layers | {info['parameters'] / 1e9:.2f} B | {_gib(info['bytes'])} | "
                     f"{_clock(info['seconds'])} |")
    lines += [""] + _render_merged(data) + _render_timings(data) + _render_sweep(data) + _render_caps(data)
    if data["pending"]:
        lines += ["Not measured yet:", ""]
        lines += [f"- `{item['text']}`: {item['note']}" for item in data["pending"]]
        lines.append("")
    lines += _render_failures(data)
    return lines


def _register_spec_renderers() -> None:
    """Render every spec's results file (`scale-<spec>.json`) as its own section, like `scale.json`."""
    for name in SPECS:
        renderer(result_key(name))(render_scale)


_register_spec_renderers()


def recover(s: Settings, records: list[dict[str, Any]], code: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data of a run that was stopped before it finished, from its progress records (`progress.jsonl`).

    Takes the records after the last `start` record (all of them when there is none, as in runs
    made before start records existed); `code` describes the measured package when no start
    record does. Only commands with a record appear; a command whose cap run did not finish has
    no cap row.
    """
    starts = [i for i, record in enumerate(records) if record.get("kind") == "start"]
    planned = list(s.commands)
    if starts:
        code = code or records[starts[-1]]["code"]
        planned = planned or records[starts[-1]]["commands"]
        records = records[starts[-1] + 1:]
    if code is None:
        raise SystemExit("the progress records name no measured code (no start record): pass it explicitly")
    spec = SPECS[s.spec]
    measured = {record["command"] for record in records if record.get("kind") in ("timing", "cap")}
    chosen = [c for c in COMMANDS if c.label in measured]
    depths = sorted({record["layers"] for record in records if record.get("kind") in ("timing", "cap")})
    checkpoints = {}
    for depth in depths:
        folder, record = cached_checkpoint(spec, depth, overrides=s.overrides or None)
        checkpoints[depth] = {"path": str(folder), "bytes": checkpoint_bytes(folder), "weights": record.get("weights"),
                              **{k: record[k] for k in ("layers", "parameters", "tensors", "shards", "seconds")}}
    timings = [{k: v for k, v in record.items() if k != "kind"} for record in records if record["kind"] == "timing"]
    caps = []
    for command in chosen:
        tried = cap_fractions(command, s)
        attempts = [{k: v for k, v in record.items() if k not in ("kind", "command", "layers")}
                    for record in records if record["kind"] == "cap" and record["command"] == command.label]
        if not attempts:
            continue
        for attempt in attempts:  # progress records hold cap / size; the search's rows hold the fraction tried
            attempt["fraction"] = min(tried, key=lambda f, got=attempt["fraction"]: abs(f - got))
        size = checkpoints[s.cap_depth]["bytes"]
        good = [a["fraction"] for a in attempts if a["ok"]]
        fraction = min(good) if good else None
        direct = bool(command.cap_fractions) and not s.quick and not any(
            t["command"] == command.label and t["layers"] == s.cap_depth for t in timings)
        caps.append({"command": command.label, "layers": s.cap_depth, "fractions": list(tried),
                     "fraction": fraction, "cap_bytes": None if fraction is None else int(fraction * size),
                     "checkpoint_bytes": size, "attempts": attempts, **({"direct": True} if direct else {})})
    pending = [{"command": c.label, "text": c.text(), "note": "not measured: the run was stopped before it got there"}
               for c in COMMANDS if c.label in planned and c.label not in measured]
    data = _data(s, spec, checkpoints, chosen, pending, timings, caps, unavailable_reason(), code)
    data["recovered"] = True
    return data


def merge_runs(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """`current` (a run of some commands) with the rows of `previous` (a stored payload) for every other command.

    The rows kept carry where they came from (`merged_from`: the commands, date, commit and the
    code measured of each earlier run), so a table mixing runs says so.
    """
    old = previous["data"]
    measured = {c["command"] for c in current["commands"]}
    kept = [c for c in old["commands"] if c["command"] not in measured]
    if not kept:
        return current
    keep = {c["command"] for c in kept}
    earlier = [{**run, "commands": [c for c in run["commands"] if c in keep]} for run in old.get("merged_from", [])]
    earlier = [run for run in earlier if run["commands"]]
    own = keep - {c for run in earlier for c in run["commands"]}
    if own:
        code = old.get("code") or {}
        earlier.append({"commands": [c["command"] for c in kept if c["command"] in own],
                        "date": previous["environment"]["date"], "commit": code.get("commit"),
                        "source": code.get("source"), "minutes": round(previous.get("seconds", 0) / 60, 1),
                        **({"recovered": True} if old.get("recovered") else {})})
    order = [c.label for c in COMMANDS]

    def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda row: order.index(row["command"]) if row["command"] in order else len(order))

    def rows(key: str) -> list[dict[str, Any]]:
        return ordered([r for r in old[key] if r["command"] in keep] + current[key])

    for cap in old["caps"]:  # rows stored before caps recorded their own fractions searched the run's
        cap.setdefault("fractions", list(old["settings"]["fractions"]))

    merged = dict(current)
    merged.update(commands=ordered(kept + current["commands"]), timings=rows("timings"), fits=rows("fits"),
                  caps=rows("caps"), checkpoints={**old["checkpoints"], **current["checkpoints"]},
                  merged_from=earlier)
    merged["checkpoints"] = dict(sorted(merged["checkpoints"].items(), key=lambda item: int(item[0])))
    listed = {c["command"] for c in merged["commands"]} | {p["command"] for p in merged["pending"]}
    merged["pending"] = merged["pending"] + [
        {"command": c.label, "text": c.text(), "note": "not measured in these runs"}
        for c in COMMANDS if c.enabled and c.label not in listed]
    return merged


def _render_merged(data: dict[str, Any]) -> list[str]:
    """Where the rows of earlier runs come from, when this section mixes runs (`merge_runs`)."""
    runs = data.get("merged_from") or []
    if not runs:
        return []
    parts = [f"{', '.join(run['commands'])}: run {run['date']} ("
             f"{'as committed at' if run.get('source') == 'head' else 'working tree at'} {run['commit']}, "
             f"{run['minutes']} min{', stopped early and recovered from its progress records' if run.get('recovered') else ''})"
             for run in runs]
    return [f"Rows from earlier runs of this suite, kept beside this run's: {'; '.join(parts)}. The rest come from "
            "the run named above.", ""]


def _render_timings(data: dict[str, Any]) -> list[str]:
    depths = sorted({row["layers"] for row in data["timings"]})
    full = data["spec"]["full_layers"]
    loads = [row["load_before"] for row in data["timings"] if "load_before" in row]
    load_note = (f" The 1-minute load average at the runs' starts ranged from {min(loads):.1f} to {max(loads):.1f} on "
                 f"{data['cpus']} CPUs: where it is above the CPU count the child shared the cores with other work, "
                 "so its wall time is inflated and its CPU time is the steadier figure." if loads else "")
    lines = ["Uncapped wall time (CPU time of the child in parentheses). Seconds per layer = (t(L) - t(L0)) / (L - L0) "
             f"over the two timing depths; full depth = t(L0) + ({full} - L0) x that.{load_note}", "",
             "| command | " + " | ".join(f"L = {d}" for d in depths) + " | s / layer | "
             f"L = {full} (extrapolated) | layer pass at the deepest (its own progress bar) | anon peak, deepest | "
             "output, deepest |",
             "|---|" + "---:|" * len(depths) + "---:|---:|---:|---:|---:|"]
    by_command: dict[str, dict[int, dict[str, Any]]] = {}
    for row in data["timings"]:
        by_command.setdefault(row["command"], {})[row["layers"]] = row
    fits = {f["command"]: f for f in data["fits"]}
    for command, rows in by_command.items():
        cells = []
        for depth in depths:
            row = rows.get(depth)
            if row is None:
                cells.append("")
            elif row["ok"]:
                cells.append(f"{_clock(row['seconds'])} ({_clock(row['cpu_seconds'])})")
            else:
                cells.append(f"**{row['outcome']}** after {_clock(row['seconds'])}")
        f = fits.get(command, {})
        per_layer = (f"**{f['wall_seconds_per_layer']:.0f} s** ({f['cpu_seconds_per_layer']:.0f} s)"
                     if "wall_seconds_per_layer" in f else "-")
        full_time = (f"**{_clock(f['wall_full_depth_seconds'])}** ({_clock(f['cpu_full_depth_seconds'])})"
                     if "wall_full_depth_seconds" in f else "-")
        deepest = rows[max(rows)]
        lines.append(f"| {command} | " + " | ".join(cells) + f" | {per_layer} | {full_time} | "
                     f"{_layer_pass(deepest)} | {_gib(deepest['peak_rss'])} | {_size(deepest['output_bytes'])} |")
    talks = [row for row in data["timings"] if row.get("communication_rank0")]
    if talks:
        lines += ["", "Communication under torchrun (rank 0, from the output's manifest: the bytes it sent into "
                  "collectives, tensors and pickled objects):", ""]
        for row in talks:
            sent = row["communication_rank0"]
            lines.append(f"- {row['command']}, {row['layers']} layers: {_size(sent['bytes'])} in "
                         f"{sent['collectives']} collectives, {_size(sent['bytes'] / row['layers'])} per decoder "
                         "layer")
    return lines + [""]


def _render_sweep(data: dict[str, Any]) -> list[str]:
    sweeps = [f for f in data["fits"] if "size_exponent" in f]
    if not sweeps:
        return []
    lines = ["Time against checkpoint size: least-squares fit of log t = a + b log(size) over the sweep depths "
             "(b = 1: time proportional to size).", "",
             "| command | depths | sizes | wall times | exponent b | r² |", "|---|---|---|---|---:|---:|"]
    rows = {(r["command"], r["layers"]): r for r in data["timings"] if r["ok"]}
    for f in sweeps:
        picked = [rows[(f["command"], d)] for d in f["sweep_depths"]]
        sizes = ", ".join(f"{r['checkpoint_bytes'] / GIB:.1f}" for r in picked)
        times = ", ".join(_clock(r["seconds"]) for r in picked)
        lines.append(f"| {f['command']} | {', '.join(map(str, f['sweep_depths']))} | {sizes} GiB | {times} | "
                     f"**{f['size_exponent']:.2f}** | {f['size_r2']:.3f} |")
    return lines + [""]


def _render_caps(data: dict[str, Any]) -> list[str]:
    if data.get("cap_unavailable"):
        return [f"Memory caps not measured: {data['cap_unavailable']}.", ""]
    if not data["caps"]:
        return []
    depth = data["caps"][0]["layers"]
    size = data["checkpoints"][str(depth)]["bytes"]
    fractions = ", ".join(f"{f:g}" for f in data["settings"]["fractions"])
    own = [cap for cap in data["caps"] if cap.get("fractions") and cap["fractions"] != data["settings"]["fractions"]]
    own_text = "".join(f"; {cap['command']} is tried at {', '.join(f'{f:g}' for f in cap['fractions'])} only"
                       + (" (its target cap, with no uncapped run at this depth: that run is also its time here)"
                          if cap.get("direct") else "") for cap in own)
    lines = [f"Smallest hard cap, as a fraction of the {depth}-layer checkpoint ({_gib(size)}), under which each "
             f"command exits 0, among {fractions}; the search starts at the first cap above the uncapped run's "
             f"anonymous peak and steps down until a run fails{own_text}. max usage = the group's peak charge "
             "(memory.max_usage_in_bytes, page cache included, so it sits near the cap when the cap forces reclaim); "
             "anon peak = sampled anonymous memory (memory.stat rss, every 50 ms).", "",
             "| command | fits under | max usage | anon peak | time under the cap | next smaller cap | attempts |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for cap in data["caps"]:
        attempts = cap["attempts"]
        if cap.get("skipped"):
            lines.append(f"| {cap['command']} | not searched: {cap['skipped']} | | | | | 0 |")
            continue
        best = next((a for a in attempts if a["ok"] and a["fraction"] == cap["fraction"]), None)
        below = [a for a in attempts if not a["ok"] and cap["fraction"] is not None and a["fraction"] < cap["fraction"]]
        below_text = (f"{max(below, key=lambda a: a['fraction'])['fraction']:g}: "
                      f"{max(below, key=lambda a: a['fraction'])['outcome']}" if below
                      else ("none tried (smallest fraction)" if cap["fraction"] is not None else "-"))
        if best is None:
            ordered = sorted(attempts, key=lambda a: a["fraction"])
            tried = ", ".join(f"{a['fraction']:g}: {a['outcome']}" for a in ordered)
            lines.append(f"| {cap['command']} | **none** ({tried}) | | | | | {len(attempts)} |")
            continue
        lines.append(f"| {cap['command']} | **{cap['fraction']:g}** ({_gib(cap['cap_bytes'])}) | "
                     f"{_gib(best['max_usage'])} | {_gib(best['peak_rss'])} | {_clock(best['seconds'])} | "
                     f"{below_text} | {len(attempts)} |")
    return lines + [""]


def _render_failures(data: dict[str, Any]) -> list[str]:
    failed = [("uncapped", row) for row in data["timings"] if not row["ok"]]
    failed += [(f"cap {a['fraction']:g}", {**a, "layers": c["layers"], "command": c["command"]})
               for c in data["caps"] for a in c.get("attempts", []) if a["outcome"] in ("error", "timeout")]
    if not failed:
        return []
    lines = ["Failures (every failed uncapped run, and capped runs that failed other than by an OOM kill), "
             "with their last stderr lines:", ""]
    for where, row in failed:
        tail = "\n".join(f"    {line}" for line in row["stderr_tail"][-6:])
        lines += [f"- {row['command']} @ {row['layers']} layers, {where}: {row['outcome']} "
                  f"(exit {row['returncode']})", "", tail, ""]
    return lines
