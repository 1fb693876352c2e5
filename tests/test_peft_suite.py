"""PEFT's own tuner tests on our methods (slow), and the harness that runs them (fast).

The slow test runs ``tests/test_custom_models.py`` of the installed peft's sdist once, with our rows
next to DeLoRA's, and fails for every test that fails for a method but passes for DeLoRA. The same
run from the command line: ``python scripts/peft_conformance.py``.
"""

from __future__ import annotations

import pytest
from peft_suite import cases, classify, junit, patch, report
from peft_suite.not_applicable import NotApplicable
from peft_suite.pairing import CONTROL, Pairing, split_name

# ------------------------------------------------------------------------------------------ slow: the run


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    from peft_suite.runner import run_suite

    run = run_suite(json_path=tmp_path_factory.mktemp("peft_suite") / "report.json")
    print(run.markdown())
    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", list(cases.METHODS))
def test_peft_tests_pass_where_the_control_passes(suite_run, method):
    result = suite_run.results[method]
    assert result.total > 0, f"no PEFT test ran for {method}"
    unpaired = [e.id for e in result.buckets[classify.UNPAIRED]]
    assert not unpaired, f"{method}: tests without a DeLoRA partner (harness problem): {unpaired}"
    gaps = result.buckets[classify.GAP]
    listing = "\n".join(f"  {e.id}: {e.message}" for e in gaps)
    assert not gaps, f"{method}: {len(gaps)} PEFT tests fail where DeLoRA passes:\n{listing}"


# ------------------------------------------------------------------------------- fast: pairing, classify

CLASS = "peft_tests.test_custom_models.TestPeftCustomModel"
MULTI = "peft_tests.test_custom_models.TestMultipleActiveAdapters"


def _case(classname, name, child=""):
    return f'<testcase classname="{classname}" name="{name}" time="0.1">{child}</testcase>'


FAIL = '<failure message="ValueError: r=4 is too large&#10;second line">trace</failure>'
ERROR = '<error message="failed on setup with &quot;TypeError: bad&quot;">trace</error>'
SKIP = '<skipped type="pytest.skip" message="not for this method">skip</skipped>'

JUNIT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
    # a gap: ours fails, the control (other index) passes
    + _case(CLASS, "test_save_pretrained[Vanilla MLP 1 DeLoRA-MLP-DeloraConfig-config_kwargs150]")
    + _case(CLASS, "test_save_pretrained[Vanilla MLP 1 LoRA-SB-MLP-LoraSBConfig-config_kwargs331]", FAIL)
    # per-class tests, stacked parametrization; an error in setup counts as a failure
    + _case(CLASS, "test_set_requires_grad[False-DeloraConfig]")
    + _case(CLASS, "test_set_requires_grad[False-LoraSBConfig]")
    + _case(CLASS, "test_set_requires_grad[True-DeloraConfig]")
    + _case(CLASS, "test_set_requires_grad[True-HUTConfig]", ERROR)
    # the control skips too
    + _case(CLASS, "test_forward_float16[Vanilla MLP 3 DeLoRA-MLP-DeloraConfig-config_kwargs152]", SKIP)
    + _case(CLASS, "test_forward_float16[Vanilla MLP 3 HUT-MLP-HUTConfig-config_kwargs343]", FAIL)
    # multiple active adapters (tuner and two indexed dicts); ours skipped where the control passes
    + _case(
        MULTI,
        "test_multiple_active_adapters_forward[DeLoRA Different-delora-DeloraConfig-config_kwargs_15-"
        "config_kwargs_25]",
    )
    + _case(
        MULTI,
        "test_multiple_active_adapters_forward[LoLDU Different-loldu-LoLDUConfig-config_kwargs_113-"
        "config_kwargs_213]",
        SKIP,
    )
    # LoLDU's extra row pairs with the case it mirrors; declared not applicable below
    + _case(CLASS, "test_merge_layers[Vanilla MLP 4 DeLoRA-MLP-DeloraConfig-config_kwargs153]")
    + _case(CLASS, "test_merge_layers[Vanilla MLP 4 LoLDU default r-MLP-LoLDUConfig-config_kwargs340]", FAIL)
    + _case(CLASS, "test_merge_layers[Vanilla MLP 4 LoLDU-MLP-LoLDUConfig-config_kwargs339]")
    # no partner; and a test of another tuner, ignored
    + _case(CLASS, "test_only_ours[LoraSBConfig]", FAIL)
    + _case(CLASS, "test_save_pretrained[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs0]", FAIL)
    + "</testsuite></testsuites>"
)
TABLE = (NotApplicable("loldu", "test_merge_*", "example reason", params="*default r*"),)


@pytest.fixture
def classified(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    return classify.classify(junit.read(path), Pairing(), TABLE)


def _ids(results, method, bucket):
    return [split_name(*e.id.split("::")).function for e in results[method].buckets[bucket]]


def test_pairing_rewrites_our_ids_to_the_controls_key():
    pairing = Pairing()
    ours = split_name(
        CLASS, "test_x[float16-LoRA-SB Same-lora_sb-LoraSBConfig-config_kwargs_112-config_kwargs_212]"
    )
    control = split_name(
        CLASS, "test_x[float16-DeLoRA Same-delora-DeloraConfig-config_kwargs_14-config_kwargs_24]"
    )
    assert pairing.key(ours)[0] == "lora_sb" and pairing.key(control)[0] == CONTROL
    assert pairing.key(ours)[1] == pairing.key(control)[1]
    assert pairing.key(split_name(CLASS, "test_x[LoraConfig]")) is None
    assert pairing.key(split_name("peft_tests.test_custom_models", "test_y")) is None


def test_classification_of_a_handmade_junit(classified):
    results, control = classified
    assert _ids(results, "lora_sb", classify.GAP) == ["test_save_pretrained"]
    assert _ids(results, "lora_sb", classify.PASS) == ["test_set_requires_grad"]
    assert _ids(results, "lora_sb", classify.UNPAIRED) == ["test_only_ours"]
    assert _ids(results, "hut", classify.GAP) == ["test_set_requires_grad"]
    assert _ids(results, "hut", classify.CONTROL_TOO) == ["test_forward_float16"]
    assert _ids(results, "loldu", classify.SKIPPED_ONLY_US) == ["test_multiple_active_adapters_forward"]
    assert _ids(results, "loldu", classify.NOT_APPLICABLE) == ["test_merge_layers"]
    assert _ids(results, "loldu", classify.PASS) == ["test_merge_layers"]
    gap = results["lora_sb"].buckets[classify.GAP][0]
    assert gap.message == "ValueError: r=4 is too large"
    assert gap.control_id.endswith("[Vanilla MLP 1 DeLoRA-MLP-DeloraConfig-config_kwargs150]")
    assert results["hut"].buckets[classify.GAP][0].message == 'failed on setup with "TypeError: bad"'
    assert results["loldu"].buckets[classify.NOT_APPLICABLE][0].reason == "example reason"
    assert control == {"passed": 5, "skipped": 1}
    assert sum(r.total for r in results.values()) == 8


def test_report_lists_the_gaps_grouped_by_error(classified):
    results, control = classified
    meta = {"peft_version": "0.0", "runtime_s": 1.0}
    text = report.markdown(results, control, meta)
    assert "| lora_sb | 3 | 1 | 1 | 0 | 0 | 0 | 1 |" in text
    assert "**1x** `ValueError: r=4 is too large`" in text
    payload = report.to_json(results, control, meta)
    assert payload["methods"]["hut"]["failure_groups"] == {
        'failed on setup with "TypeError: bad"': [
            "TestPeftCustomModel::test_set_requires_grad[True-HUTConfig]"
        ]
    }


# ------------------------------------------------------------------------------------ fast: cases, patch


def test_cases_mirror_the_control_rows():
    pairs = cases.name_pairs()
    assert pairs["lora_sb"]["Vanilla MLP 5 LoRA-SB"] == "Vanilla MLP 5 DeLoRA"
    assert pairs["loldu"]["Vanilla MLP 4 LoLDU default r"] == "Vanilla MLP 4 DeLoRA"
    assert pairs["hut"]["HUT Different"] == "DeLoRA Different"
    lora_sb = cases.METHODS["lora_sb"]
    assert cases.translate({"target_modules": ["lin0"], "module_dropout": 0.1}, lora_sb) == {
        "target_modules": ["lin0"],
        "dropout": 0.1,
        "r": 4,
    }
    assert cases.translate({"target_modules": ["lin0", "lin1"]}, lora_sb)["r"] == 2  # lin1 is 20 -> 2
    with pytest.raises(ValueError, match="delora_lambda"):
        cases.translate({"target_modules": "lin0", "delora_lambda": 3}, lora_sb)


DeloraConfig = type("DeloraConfig", (), {})
FAKE = '''# Copyright header
"""Module docstring."""

import copy

TEST_CASES = [
    ("Other", "MLP", object, dict()),
{delora}
]
ALL_PEFT_CONFIG_CLASSES = sorted({{row[2] for row in TEST_CASES}}, key=lambda cls: cls.__name__)

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
{multi}
]


def after():
    return [
        1,
    ]
'''


def _fake_source(drop_last_control_row=False):
    rows = list(cases.CONTROL_CASES[:-1] if drop_last_control_row else cases.CONTROL_CASES)
    delora = "\n".join(f"    ({n!r}, {m!r}, DeloraConfig, {kw!r})," for n, m, kw in rows)
    multi = "\n".join(
        f"    ({n!r}, 'delora', DeloraConfig, {a!r}, {b!r})," for n, a, b in cases.CONTROL_MULTIPLE_ACTIVE
    )
    return FAKE.format(delora=delora, multi=multi)


def _run(source):
    namespace = {"DeloraConfig": DeloraConfig}
    exec(compile(source, "fake_test_custom_models.py", "exec"), namespace)
    return namespace


def test_patch_adds_our_rows_where_peft_derives_its_matrices():
    patched = patch.patch_source(_fake_source(), ["lora_sb", "hut"])
    lines = patched.splitlines()
    added = [i for i, line in enumerate(lines) if line.endswith(patch.MARK)]
    assert len(added) == 4 and lines[added[0]] == "import ortho_adapters" + patch.MARK
    assert added[0] < lines.index("import copy")
    assert lines[added[2] + 1].startswith("ALL_PEFT_CONFIG_CLASSES = ")
    assert lines[added[3] - 1] == "]" and lines[added[3] + 3] == "def after():"
    ns = _run(patched)
    names = [row[0] for row in ns["TEST_CASES"]]
    assert (
        "Vanilla MLP 3 LoRA-SB" in names
        and "Vanilla MLP 1 HUT" in names
        and "Vanilla MLP 1 LoLDU" not in names
    )
    assert {c.__name__ for c in ns["ALL_PEFT_CONFIG_CLASSES"]} >= {"LoraSBConfig", "HUTConfig"}
    multi = {row[0]: row for row in ns["MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES"]}
    assert multi["HUT Same"][1] == "hut" and multi["HUT Same"][3]["init_weights"] is False
    lora_sb_3 = next(row for row in ns["TEST_CASES"] if row[0] == "Vanilla MLP 3 LoRA-SB")
    lora_sb_3[2](**lora_sb_3[3])  # a valid config


def test_patch_fails_loudly_when_peft_changed():
    with pytest.raises(RuntimeError, match="rows of TEST_CASES changed"):
        _run(patch.patch_source(_fake_source(drop_last_control_row=True), ["hut"]))
    source = _fake_source()
    for anchor in ("ALL_PEFT_CONFIG_CLASSES = ", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = ["):
        with pytest.raises(patch.PatchError, match="found 0 times"):
            patch.patch_source(source.replace(anchor, "RENAMED = "), ["hut"])
    doubled = source + "\nALL_PEFT_CONFIG_CLASSES = []\n"
    with pytest.raises(patch.PatchError, match="found 2 times"):
        patch.patch_source(doubled, ["hut"])
