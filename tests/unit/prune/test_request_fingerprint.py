"""A request's fingerprint: its options as JSON-ready values, so a resumed run can compare them with the stored run's."""

from __future__ import annotations

import json
from pathlib import Path

from moecompress.calibration.data import DomainSource
from moecompress.calibration.request import CalibrationRequest
from moecompress.prune.request import PruneRequest


def test_prune_fingerprint_keeps_sources_as_reprs_and_paths_as_text(tmp_path: Path) -> None:
    source = DomainSource("code", tmp_path / "code.jsonl")
    request = PruneRequest(method="frequency", ratio=0.5, sources=[source], patterns=tmp_path / "patterns")
    data = request.fingerprint()
    assert data["sources"] == [repr(source)]
    assert data["patterns"] == str(tmp_path / "patterns")
    assert data["method"] == "frequency" and data["ratio"] == 0.5
    assert json.loads(json.dumps(data)) == data
    assert PruneRequest(method="frequency", ratio=0.5).fingerprint()["patterns"] is None
    assert PruneRequest(method="frequency", ratio=0.5).fingerprint() != PruneRequest(ratio=0.25).fingerprint()


def test_calibration_fingerprint_changes_with_its_data(tmp_path: Path) -> None:
    first = CalibrationRequest(sources=[DomainSource("a", tmp_path / "a.txt")]).fingerprint()
    second = CalibrationRequest(sources=[DomainSource("b", tmp_path / "a.txt")]).fingerprint()
    assert first["sources"] != second["sources"]
    assert CalibrationRequest().fingerprint()["sources"] == []
    assert json.loads(json.dumps(first)) == first
