"""Tests a method cannot pass by its nature, each with the reason. Start and stay EMPTY unless a test
really asks for something the method's math cannot do: this table must never hide a bug.

An entry matches a test when its ``method`` is the method's key, its ``test`` pattern (fnmatch) matches
the test function's name and its ``params`` pattern matches pytest's parameter id (what stands between
the brackets of ``test_x[...]``; ``*`` by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional

from .pairing import TestId


@dataclass(frozen=True)
class NotApplicable:
    method: str  # a key of cases.METHODS: "lora_sb", "loldu", "hut", "fedsvd"
    test: str  # fnmatch pattern on the test function's name
    reason: str  # why the method cannot, by its nature
    params: str = "*"  # fnmatch pattern on the parameter id, e.g. "*default r*"


NOT_APPLICABLE: tuple[NotApplicable, ...] = (
    NotApplicable(
        "loldu",
        "test_loading_model*requires_grad_set_correctly",
        "saves an adapter and loads it onto a freshly, differently initialized base model. LoLDU's default "
        "file holds only z, z0 and a fingerprint: its frozen LU factors are a function of the base weight "
        "and are rebuilt at load, so a different base is refused with a ValueError naming the layer (never a "
        "silently different model). With LoLDUConfig(store_factors=True) such a load works "
        "(tests/test_loldu.py::test_stored_factors_load_onto_any_base).",
    ),
)


def reason_for(method: str, test: TestId, table: tuple[NotApplicable, ...] = NOT_APPLICABLE) -> Optional[str]:
    """The declared reason ``test`` does not apply to ``method``, or None."""
    for entry in table:
        if (
            entry.method == method
            and fnmatchcase(test.function, entry.test)
            and fnmatchcase(test.params, entry.params)
        ):
            return entry.reason
    return None
