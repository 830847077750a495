"""Every skip in the test suite, and why: the listed refusals, and the environment skips.

A test that runs over every architecture may skip a case only when the case is listed in
EXPECTED_REFUSALS below. A listed case must still be refused with its listed message (then it is
skipped with the listed reason); a listed case that is no longer refused fails ("update the
table"); any MoecompressError that is not listed fails the test. So a regression that raises
MoecompressError shows up as a failure, not as one more skip, and the table cannot go stale
(`tests/adapters/test_contract.py::test_expected_skips_table_is_current` also checks that every
entry names a real test and a registered tiny architecture, and that the table below matches).

Listed architecture refusals (the skip reason is `<architecture>: <reason>`):

| test | architecture | reason |
|---|---|---|
| test_uniform_neuron_drop_equals_zeroed_neurons | afmoe | its shared experts are moe_intermediate_size x num_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | aria_text | its shared experts (moe_num_shared_experts > 0 in the tiny config) are sized by the routed experts' intermediate_size: one key cannot hold two widths, so uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | axk1 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | axk2 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | bailing_hybrid | its shared experts (n_shared_experts > 0 in the tiny config) are sized by moe_intermediate_size too: one key cannot hold two widths, so uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | deepseek_v2 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | deepseek_v3 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | deepseek_v32 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | dots1 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | ernie4_5_moe | its shared experts are moe_intermediate_size x moe_num_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | exaone_moe | its shared experts are moe_intermediate_size x num_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | glm4_moe | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | glm4_moe_lite | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | glm_moe_dsa | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | hunyuan_v1_moe | its shared MLP and its routed experts are both sized by intermediate_size: one key cannot hold two widths, so uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | hy_v3 | its shared experts are moe_intermediate_size x num_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | hy_v4 | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | inkling_text | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | jamba | the tiny config has dense MLP layers (expert_layer_period 2) sized by the routed experts' intermediate_size: one key cannot hold two widths, so uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | kimi_linear | its shared experts are moe_intermediate_size x num_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | llama4_text | its shared expert and its routed experts are both sized by intermediate_size: one key cannot hold two widths, so uniform neuron pruning has no stock config |
| test_uniform_neuron_drop_equals_zeroed_neurons | solar_open | its shared experts are moe_intermediate_size x n_shared_experts wide, so narrowing the routed experts would resize them too: uniform neuron pruning has no stock config |
| test_heapr_neuron_layouts_equal_zeroed_neurons | dbrx | DBRX stores a layer's experts flattened into (E * I, H) tensors, so per-expert widths (HEAPr's global layout) cannot be laid out; only uniform pruning, done by its adapter's own drop, is supported |
| test_condensed_mlp_equals_fixed_weight_experts | llama4_text | Llama 4 scales each expert's input by its router score, so its experts are not a (hidden, index, weights) module that one dense MLP can replace: condensing is not supported |
| test_condensed_model_equals_masked_model_and_round_trips | llama4_text | Llama 4 scales each expert's input by its router score, so its experts are not a (hidden, index, weights) module that one dense MLP can replace: condensing is not supported |
| test_nonuniform_layout_equals_masked_and_reloads | dbrx | DBRX stores a layer's experts flattened into (E * I, H) tensors, so per-layer expert counts and per-expert widths cannot be laid out; only uniform pruning, done by its adapter's own drop, is supported |
| test_nonuniform_layout_equals_masked_and_reloads | inkling_text | Inkling's router keeps the shared experts in its last rows, so a layer cannot keep its own number of routed experts: per-layer expert counts are refused |

Checked the same way, but not skips (empty today, so any MoecompressError there fails):
- test_prune_methods.py, calibration with every statistic (gradients included) in
  test_every_method_equals_masked and test_heapr_neuron_layouts_equal_zeroed_neurons: no architecture.
- test_layout.py::test_nonuniform_layout_equals_masked_and_reloads, fewer than two MoE layers: no architecture.
- test_prune_methods.py::test_heapr_neuron_layouts_equal_zeroed_neurons, uniform-width half
  (`check_width_patchable`): the same 22 architectures and reasons as
  test_uniform_neuron_drop_equals_zeroed_neurons. The test checks HEAPr's global layout first,
  then stops before the uniform half for these (it passes; it is not a skip; the uniform half is
  covered, and skipped, by the contract test above).

Environment and optional-dependency skips (left as they are; each reason names what is missing):

| test | case | reason |
|---|---|---|
| integration/test_quant_roundtrip.py::test_gptqmodel_loads_the_gptq_folder | every case | optional dependency missing: "gptqmodel is not installed (pip install 'moecompress[gptq]')" |
| integration/test_quant_roundtrip.py::test_gptqmodel_loads_the_gptq_folder | granitemoe | xfail, listed in GPTQMODEL_CANNOT_LOAD: "GPTQModel 7.6 does not attach quantised GraniteMoE experts" (fails once GPTQModel loads it) |
| unit/quant/test_pack.py::test_packing_matches_gptqmodel_dequantisation | every bit width | optional dependency missing: "gptqmodel is not installed" |
| benchmarks/test_quantisation.py::test_gptqmodel_peer_row | - | optional dependency missing (skipif): "gptqmodel is not installed" |
| benchmarks/test_quantisation.py::test_gptqmodel_failures_are_recorded_with_their_reason | - | optional dependency missing (skipif): "gptqmodel is not installed" |
| reliability/test_router_mask.py::test_mask_under_an_accelerate_hook | - | optional dependency missing (importorskip): "could not import 'accelerate.hooks'" |
| integration/test_cli_inspect_eval.py::test_installed_console_script | - | "console script not installed in this environment" (the package is not pip-installed) |
| unit/test_data.py::test_repo_and_package_copies_match | - | "not running from a source checkout" |
| unit/test_data.py::test_build_script_reproduces_shipped_sets | - | "not running from a source checkout", or "the shipped sets were built with other Python or package versions" |
| unit/test_sizes.py::test_shared_experts_dense_layer_and_router_buffers | deepseek_v3 | "no deepseek_v3 tiny config" (never today: deepseek_v3 is registered) |
| benchmarks/test_scale.py::test_run_capped_under_a_real_cgroup | - | "capped runs unavailable here: <why>" (no usable cgroup v2 memory controller) |
| benchmarks/test_costs.py::test_rss_sampler_sees_an_anonymous_allocation_and_a_mapped_file | - | "needs Linux /proc/self/status" |
| reliability/test_bad_inputs.py::test_bad_input_gets_one_line | output-read-only, disk-fills-up | "cannot mount a tmpfs here (needs root): <mount's message>" |
| reliability/test_bad_inputs.py::test_bad_input_gets_one_line | cuda-without-gpu, quantize-cuda-without-gpu | "this machine has a GPU: --device cuda is valid here" |
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from moecompress.errors import MoecompressError

# The tests (and parts of tests) that consult the table: "<file>::<test function>[ (<part>)]".
CONTRACT_UNIFORM_NEURONS = "adapters/test_contract.py::test_uniform_neuron_drop_equals_zeroed_neurons"
PRUNE_METHODS_CALIBRATION = "integration/test_prune_methods.py::test_every_method_equals_masked (calibration)"
HEAPR_CALIBRATION = "integration/test_prune_methods.py::test_heapr_neuron_layouts_equal_zeroed_neurons (calibration)"
HEAPR_GLOBAL_LAYOUT = "integration/test_prune_methods.py::test_heapr_neuron_layouts_equal_zeroed_neurons"
HEAPR_UNIFORM_WIDTH = "integration/test_prune_methods.py::test_heapr_neuron_layouts_equal_zeroed_neurons (uniform half)"
CONDENSE_LAYER = "unit/condense/test_cd_moe.py::test_condensed_mlp_equals_fixed_weight_experts"
CONDENSE_MODEL = "unit/condense/test_cd_moe.py::test_condensed_model_equals_masked_model_and_round_trips"
NONUNIFORM_LAYOUT = "unit/prune/test_layout.py::test_nonuniform_layout_equals_masked_and_reloads"
NONUNIFORM_LAYOUT_LAYERS = "unit/prune/test_layout.py::test_nonuniform_layout_equals_masked_and_reloads (MoE layers)"

KNOWN_TESTS = (CONTRACT_UNIFORM_NEURONS, PRUNE_METHODS_CALIBRATION, HEAPR_CALIBRATION, HEAPR_GLOBAL_LAYOUT,
               HEAPR_UNIFORM_WIDTH, CONDENSE_LAYER, CONDENSE_MODEL, NONUNIFORM_LAYOUT, NONUNIFORM_LAYOUT_LAYERS)
# Parts that stop the test early (it passes) instead of skipping it.
NOT_SKIPS = (HEAPR_UNIFORM_WIDTH,)


@dataclass(frozen=True)
class Refusal:
    """Why an architecture cannot run a test, and a substring of the MoecompressError it must raise."""

    reason: str
    message: str


def _shared_width(arch: str, count_key: str) -> Refusal:
    return Refusal(f"its shared experts are moe_intermediate_size x {count_key} wide, so narrowing the routed "
                   "experts would resize them too: uniform neuron pruning has no stock config",
                   f"{arch}: the shared experts' width is moe_intermediate_size x {count_key}")


# Uniform-width neuron pruning saved as a stock config (adapter.check_width_patchable refuses).
WIDTH_REFUSALS: dict[str, Refusal] = {
    **{arch: _shared_width(arch, "n_shared_experts")
       for arch in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "glm4_moe", "glm4_moe_lite",
                    "glm_moe_dsa", "hy_v4", "inkling_text", "solar_open")},
    **{arch: _shared_width(arch, "num_shared_experts") for arch in ("afmoe", "exaone_moe", "hy_v3", "kimi_linear")},
    "ernie4_5_moe": _shared_width("ernie4_5_moe", "moe_num_shared_experts"),
    "aria_text": Refusal("its shared experts (moe_num_shared_experts > 0 in the tiny config) are sized by the routed "
                         "experts' intermediate_size: one key cannot hold two widths, so uniform neuron pruning has "
                         "no stock config",
                         "aria_text model sizes its shared experts with the routed experts' intermediate_size"),
    "bailing_hybrid": Refusal("its shared experts (n_shared_experts > 0 in the tiny config) are sized by "
                              "moe_intermediate_size too: one key cannot hold two widths, so uniform neuron pruning "
                              "has no stock config",
                              "bailing_hybrid model sizes its shared experts with moe_intermediate_size too"),
    "hunyuan_v1_moe": Refusal("its shared MLP and its routed experts are both sized by intermediate_size: one key "
                              "cannot hold two widths, so uniform neuron pruning has no stock config",
                              "hunyuan_v1_moe sizes its shared MLP and its routed experts with the same "
                              "intermediate_size"),
    "jamba": Refusal("the tiny config has dense MLP layers (expert_layer_period 2) sized by the routed experts' "
                     "intermediate_size: one key cannot hold two widths, so uniform neuron pruning has no stock config",
                     "jamba model has dense MLP layers sized by the routed experts' intermediate_size"),
    "llama4_text": Refusal("its shared expert and its routed experts are both sized by intermediate_size: one key "
                           "cannot hold two widths, so uniform neuron pruning has no stock config",
                           "llama4_text sizes its shared expert and its routed experts with the same "
                           "intermediate_size"),
}

_LLAMA4_CONDENSE = Refusal("Llama 4 scales each expert's input by its router score, so its experts are not a "
                           "(hidden, index, weights) module that one dense MLP can replace: condensing is not "
                           "supported",
                           "are not a module of the MoE block with the (hidden, index, weights) interface")
_DBRX_LAYOUT = "dbrx: per-layer expert counts and per-expert widths are not supported (experts are stored flattened)"

EXPECTED_REFUSALS: dict[tuple[str, str], Refusal] = {
    **{(CONTRACT_UNIFORM_NEURONS, arch): refusal for arch, refusal in WIDTH_REFUSALS.items()},
    **{(HEAPR_UNIFORM_WIDTH, arch): refusal for arch, refusal in WIDTH_REFUSALS.items()},
    (HEAPR_GLOBAL_LAYOUT, "dbrx"): Refusal(
        "DBRX stores a layer's experts flattened into (E * I, H) tensors, so per-expert widths (HEAPr's global "
        "layout) cannot be laid out; only uniform pruning, done by its adapter's own drop, is supported", _DBRX_LAYOUT),
    (CONDENSE_LAYER, "llama4_text"): _LLAMA4_CONDENSE,
    (CONDENSE_MODEL, "llama4_text"): _LLAMA4_CONDENSE,
    (NONUNIFORM_LAYOUT, "dbrx"): Refusal(
        "DBRX stores a layer's experts flattened into (E * I, H) tensors, so per-layer expert counts and per-expert "
        "widths cannot be laid out; only uniform pruning, done by its adapter's own drop, is supported", _DBRX_LAYOUT),
    (NONUNIFORM_LAYOUT, "inkling_text"): Refusal(
        "Inkling's router keeps the shared experts in its last rows, so a layer cannot keep its own number of routed "
        "experts: per-layer expert counts are refused",
        "inkling_text: per-layer expert layouts are not supported (the router's last rows belong to the shared "
        "experts)"),
    # (NONUNIFORM_LAYOUT_LAYERS, arch): Refusal(reason, "one MoE layer only") for a model with < 2 MoE layers
}


def _where(test: str, case: str) -> str:
    return f"{test} [{case}]"


class expect_refusal:  # noqa: N801 (used as a context manager, like pytest.raises)
    """Run the block under the table's expectation for (test, case).

    Listed: the block must raise MoecompressError containing the listed message; it is then
    skipped with the listed reason (or, with skip=False, swallowed and recorded in `refused`).
    Unlisted: any MoecompressError fails the test (raised as it is, with a note). Listed but not
    raised: the test fails. Skips and failures are reported at the test's own line.
    """

    def __init__(self, test: str, case: str, skip: bool = True) -> None:
        self.test, self.case, self.skip = test, case, skip
        self.expected = EXPECTED_REFUSALS.get((test, case))
        self.refused: Refusal | None = None

    def __enter__(self) -> expect_refusal:
        return self

    def __exit__(self, kind, err, tb) -> bool:  # noqa: ANN001
        __tracebackhide__ = True
        where, expected = _where(self.test, self.case), self.expected
        if err is None:
            if expected is not None:
                pytest.fail(f"{where}: expected to be refused ({expected.message!r}) but it ran; "
                            "update the table in tests/expected_skips.py", pytrace=False)
            return False
        if not isinstance(err, MoecompressError):
            return False
        if expected is None:
            err.add_note(f"{where}: this MoecompressError is not an expected refusal "
                         "(not listed in tests/expected_skips.py)")
            return False
        if expected.message not in str(err):
            err.add_note(f"{where}: refused, but the listed message is {expected.message!r}; "
                         "update tests/expected_skips.py if the new refusal is intended")
            return False
        if self.skip:
            pytest.skip(f"{self.case}: {expected.reason}")
        self.refused = expected
        return True


def expect_condition(test: str, case: str, happened: bool, observed: str) -> None:
    """A skip for a condition seen in the test (not an error): skip if it happened and is listed.

    Happened and listed (with `observed` containing the listed message): skipped with the listed
    reason. Happened but not listed: fails. Listed but did not happen: fails (update the table).
    """
    __tracebackhide__ = True
    expected = EXPECTED_REFUSALS.get((test, case))
    if not happened:
        if expected is not None:
            pytest.fail(f"{_where(test, case)}: expected {expected.message!r} but it no longer holds; "
                        "update the table in tests/expected_skips.py", pytrace=False)
        return
    if expected is None or expected.message not in observed:
        pytest.fail(f"{_where(test, case)}: {observed}; not listed in tests/expected_skips.py", pytrace=False)
    pytest.skip(f"{case}: {expected.reason}")
