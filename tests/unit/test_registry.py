"""The adapter registry: supported and unsupported model types are consistent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter, supported_model_types, unsupported_model_types


def test_supported_and_unsupported_are_disjoint() -> None:
    overlap = set(supported_model_types()) & set(unsupported_model_types())
    assert not overlap, f"model types both supported and listed as unsupported: {sorted(overlap)}"


def test_unsupported_entries_are_real_model_types_with_reasons() -> None:
    unsupported = unsupported_model_types()
    must_explain = {"dbrx", "jetmoe", "deepseek_v4", "switch_transformers", "nllb-moe"} - set(supported_model_types())
    missing = must_explain - set(unsupported)
    assert not missing, f"MoE types neither supported nor explained: {sorted(missing)}"
    for model_type, reason in unsupported.items():
        assert model_type in CONFIG_MAPPING_NAMES, f"{model_type!r} is not a transformers model_type"
        assert reason.strip() and "\n" not in reason, f"{model_type!r} needs a one-line reason"


@pytest.mark.parametrize("model_type", sorted(unsupported_model_types()))
def test_get_adapter_on_unsupported_type_raises_with_reason(model_type: str) -> None:
    reason = unsupported_model_types()[model_type]
    with pytest.raises(MoecompressError) as err:
        get_adapter(SimpleNamespace(model_type=model_type))
    assert model_type in str(err.value)
    assert reason in str(err.value)


def test_get_adapter_on_unknown_type_lists_supported() -> None:
    with pytest.raises(MoecompressError, match="supported: "):
        get_adapter(SimpleNamespace(model_type="llama"))


def test_get_adapter_returns_registered_adapter() -> None:
    for model_type in supported_model_types():
        adapter = get_adapter(SimpleNamespace(model_type=model_type))
        assert model_type in adapter.model_types
