"""Our rows for PEFT's ``TEST_CASES`` and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, mirrored from the
control's (DeLoRA's) rows of PEFT 0.21.2: same model, same targets, same test-name pattern with the
method's label in place of ``DeLoRA``.

The patched ``test_custom_models.py`` calls :func:`test_cases` and :func:`multiple_active_cases`; both
first check that PEFT's control rows are still exactly :data:`CONTROL_CASES` /
:data:`CONTROL_MULTIPLE_ACTIVE` (a PEFT upgrade that changes them fails loudly instead of pairing nothing).
This module imports nothing heavy at import time: the pytest plugin and the pairing use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTROL_LABEL = "DeLoRA"
CONTROL_CONFIG = "DeloraConfig"
CONTROL_TUNER = "delora"


@dataclass(frozen=True)
class Method:
    key: str  # CLI name and PEFT's ``tuner_method`` in the multiple-active cases
    label: str  # replaces "DeLoRA" in the test names
    config: str  # config class name in ``ortho_adapters`` (and in pytest's ids)
    r: int  # rank of the mirrored cases (clamped per layer, see :func:`_rank`)


METHODS: dict[str, Method] = {
    "lora_sb": Method("lora_sb", "LoRA-SB", "LoraSBConfig", 4),
    "loldu": Method("loldu", "LoLDU", "LoLDUConfig", 8),
    "hut": Method("hut", "HUT", "HUTConfig", 4),
    "fedsvd": Method("fedsvd", "FedSVD", "FedSVDConfig", 4),
    "ortho_lora": Method("ortho_lora", "OrthoLoRA", "OrthoLoraConfig", 4),
    "o3": Method("o3", "O3", "O3Config", 4),
}

# PEFT 0.21.2's DeLoRA rows of TEST_CASES: (test_name, model_id, config_kwargs).
CONTROL_CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Vanilla MLP 1 DeLoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 DeLoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 DeLoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 DeLoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 DeLoRA", "MLP", {"target_modules": ["lin0"], "module_dropout": 0.1}),
)
# ... and of MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: (test_name, config_kwargs_1, config_kwargs_2).
CONTROL_MULTIPLE_ACTIVE: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    (
        "DeLoRA Same",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "DeLoRA Different",
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
)

# Extra rows per method: (control test name it mirrors, suffix of our name, kwargs keys to drop).
# LoLDU's default r (full rank per layer) must work on PEFT's tiny MLP too.
VARIANTS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    "loldu": (("Vanilla MLP 4 DeLoRA", " default r", ("r",)),),
}

# DeLoRA's kwargs -> ours. A control kwarg missing here fails loudly (add its translation).
KWARG_MAP = {"target_modules": "target_modules", "module_dropout": "dropout", "init_weights": "init_weights"}

# (out, in) of PEFT's ``MLP`` layers (lin0: Linear(10, 20), lin1: Linear(20, 2)); every rank is clamped
# to min(out, in) of its targets, since our layers refuse r > min(out, in): lin1 allows at most r=2.
MLP_SHAPES = {"lin0": (20, 10), "lin1": (2, 20)}


def methods(keys: tuple[str, ...] | list[str] | None = None) -> list[Method]:
    """The :class:`Method` of each key (all when None); unknown keys fail with the known ones."""
    keys = list(METHODS) if keys is None else list(keys)
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    return [METHODS[k] for k in keys]


def our_name(control_name: str, method: Method, suffix: str = "") -> str:
    if CONTROL_LABEL not in control_name:
        raise ValueError(f"control test name {control_name!r} does not contain {CONTROL_LABEL!r}")
    return control_name.replace(CONTROL_LABEL, method.label) + suffix


def name_pairs(keys: tuple[str, ...] | list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{method key: {our test name: the control's test name}}`` for every row we add."""
    pairs: dict[str, dict[str, str]] = {}
    for method in methods(keys):
        names = {our_name(n, method): n for n, _, _ in CONTROL_CASES}
        names.update({our_name(n, method): n for n, _, _ in CONTROL_MULTIPLE_ACTIVE})
        for control, suffix, _ in VARIANTS.get(method.key, ()):
            names[our_name(control, method, suffix)] = control
        pairs[method.key] = names
    return pairs


def _rank(method: Method, targets: Any) -> int:
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in MLP_SHAPES]
    if unknown:
        raise ValueError(f"no MLP shape known for target(s) {unknown}: extend MLP_SHAPES in {__name__}")
    return min([method.r] + [min(MLP_SHAPES[t]) for t in targets])


def translate(kwargs: dict[str, Any], method: Method, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The control's config kwargs in our terms, with ``r`` set (unless dropped)."""
    missing = [k for k in kwargs if k not in KWARG_MAP]
    if missing:
        raise ValueError(f"no translation for the control's kwargs {missing}: extend KWARG_MAP in {__name__}")
    ours = {KWARG_MAP[k]: v for k, v in kwargs.items()}
    ours["r"] = _rank(method, kwargs["target_modules"])
    return {k: v for k, v in ours.items() if k not in drop}


def _config_cls(method: Method) -> type:
    import ortho_adapters

    return getattr(ortho_adapters, method.config)


def _check(found: list[tuple], expected: tuple[tuple, ...], what: str) -> None:
    if tuple(found) != expected:
        raise RuntimeError(
            f"PEFT's {CONTROL_CONFIG} rows of {what} changed (the control of the conformance harness):\n"
            f"  expected {list(expected)}\n  found    {found}\nupdate tests/peft_suite/cases.py"
        )


def test_cases(peft_rows: list[tuple], keys: tuple[str, ...] | list[str] | None = None) -> list[tuple]:
    """Our ``(test_name, model_id, config_cls, config_kwargs)`` rows, after checking PEFT's control rows."""
    found = [(n, m, kw) for n, m, cls, kw in peft_rows if cls.__name__ == CONTROL_CONFIG]
    _check(found, CONTROL_CASES, "TEST_CASES")
    rows = []
    for method in methods(keys):
        cls = _config_cls(method)
        for name, model_id, kwargs in CONTROL_CASES:
            rows.append((our_name(name, method), model_id, cls, translate(kwargs, method)))
        for control, suffix, drop in VARIANTS.get(method.key, ()):
            name, model_id, kwargs = next(row for row in CONTROL_CASES if row[0] == control)
            rows.append((our_name(name, method, suffix), model_id, cls, translate(kwargs, method, drop)))
    return rows


test_cases.__test__ = False  # not a pytest test, despite the name


def multiple_active_cases(
    peft_rows: list[tuple], keys: tuple[str, ...] | list[str] | None = None
) -> list[tuple]:
    """Our ``(test_name, tuner_method, config_cls, kwargs_1, kwargs_2)`` rows (control rows checked first)."""
    found = [
        (n, kw1, kw2)
        for n, tuner, cls, kw1, kw2 in peft_rows
        if cls.__name__ == CONTROL_CONFIG and tuner == CONTROL_TUNER
    ]
    _check(found, CONTROL_MULTIPLE_ACTIVE, "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES")
    rows = []
    for method in methods(keys):
        cls = _config_cls(method)
        for name, kw1, kw2 in CONTROL_MULTIPLE_ACTIVE:
            rows.append(
                (our_name(name, method), method.key, cls, translate(kw1, method), translate(kw2, method))
            )
    return rows
