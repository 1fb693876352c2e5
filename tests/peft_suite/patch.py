"""A patched copy of PEFT's tests: our rows appended to its test matrices, loudly.

Three edits to ``test_custom_models.py``, each at an anchor that must occur exactly once (otherwise
:class:`PatchError` says which): ``import ortho_adapters`` before the first import; our ``TEST_CASES``
rows right before ``ALL_PEFT_CONFIG_CLASSES = ...`` (so the per-class tests see our configs too); our
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` rows right after that list. Every added line ends with
:data:`MARK`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

TARGET = "test_custom_models.py"
PACKAGE = "peft_tests"  # the copy's package name (PEFT's tests use relative imports)
MARK = "  # added by ortho_adapters' PEFT conformance harness (tests/peft_suite)"

_FIRST_IMPORT = re.compile(r"^(?:import |from (?!__future__ ))", re.M)
_ALL_CLASSES = re.compile(r"^ALL_PEFT_CONFIG_CLASSES = ", re.M)
_MULTI_START = re.compile(r"^MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = \[[ \t]*$", re.M)
_LIST_END = re.compile(r"^\][ \t]*$", re.M)


class PatchError(RuntimeError):
    pass


def _fail(what: str, problem: str) -> PatchError:
    return PatchError(
        f"cannot patch PEFT's {TARGET}: anchor {what} {problem}; PEFT's test file changed, "
        "update tests/peft_suite/patch.py"
    )


def _unique(pattern: re.Pattern, text: str, what: str) -> re.Match:
    found = list(pattern.finditer(text))
    if len(found) != 1:
        raise _fail(f"{what} ({pattern.pattern!r})", f"found {len(found)} times, expected once")
    return found[0]


def patch_source(text: str, methods: list[str]) -> str:
    """``text`` of PEFT's ``test_custom_models.py`` with our rows for ``methods`` added."""
    keys = repr(tuple(methods))
    first_import = _FIRST_IMPORT.search(text)
    if first_import is None:
        raise _fail("'first import'", "not found")
    all_classes = _unique(_ALL_CLASSES, text, "ALL_PEFT_CONFIG_CLASSES")
    multi = _unique(_MULTI_START, text, "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES")
    multi_end = _LIST_END.search(text, multi.end())
    if multi_end is None:
        raise _fail("']' closing MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "not found")
    if not first_import.start() < all_classes.start() < multi.start():
        raise _fail("order", "is not: import < ALL_PEFT_CONFIG_CLASSES < MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES")
    multi_var = "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES"
    edits = [
        (first_import.start(), f"import ortho_adapters{MARK}\n"),
        (
            all_classes.start(),
            f"from peft_suite import cases as _ortho_cases{MARK}\n\n"
            f"TEST_CASES += _ortho_cases.test_cases(TEST_CASES, {keys}){MARK}\n",
        ),
        (multi_end.end(), f"\n{multi_var} += _ortho_cases.multiple_active_cases({multi_var}, {keys}){MARK}"),
    ]
    for pos, insert in sorted(edits, reverse=True):
        text = text[:pos] + insert + text[pos:]
    return text


def make_workspace(peft_tests: Path, dest: Path, methods: list[str]) -> Path:
    """Copy ``peft_tests`` into ``dest/peft_tests`` as a package, patch it; return the patched file."""
    package = dest / PACKAGE
    shutil.copytree(peft_tests, package)
    (package / "__init__.py").touch()
    target = package / TARGET
    target.write_text(patch_source(target.read_text(encoding="utf-8"), methods), encoding="utf-8")
    (dest / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return target
