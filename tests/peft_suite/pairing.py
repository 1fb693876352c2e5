"""Pair each of our test ids with the control's id of the same test function and case.

A pytest id of PEFT's parametrized tests names the config class (``...-LoraSBConfig-...``), the case
(``Vanilla MLP 1 LoRA-SB``), the tuner (``lora_sb``) and, for dict arguments, ``<argname><index>`` where
the index is the row's position in the list (different for our rows and the control's). A test's *key*
is its id with all of that rewritten to the control's spelling, so that a test and its control share it:
``test_x[Vanilla MLP 1 LoRA-SB-MLP-LoraSBConfig-config_kwargs331]`` and
``test_x[Vanilla MLP 1 DeLoRA-MLP-DeloraConfig-config_kwargs150]`` both give
``test_x[Vanilla MLP 1 DeLoRA-MLP-DeloraConfig-config_kwargs#]``.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from . import cases

CONTROL = "control"
# Arguments of the parametrizations we extend whose values are dicts (pytest ids them by position).
INDEXED_ARGNAMES = ("config_kwargs_1", "config_kwargs_2", "config_kwargs")


class TestId(NamedTuple):
    owner: str  # the test's class (or module) name
    function: str  # test function name, without parameters
    params: str  # pytest's parameter id, without brackets ("" when not parametrized)

    @property
    def name(self) -> str:
        return f"{self.function}[{self.params}]" if self.params else self.function

    def __str__(self) -> str:
        return f"{self.owner}::{self.name}"


TestId.__test__ = False  # not a pytest test class


def split_name(owner: str, name: str) -> TestId:
    """``("TestX", "test_y[a-b]")`` -> ``TestId("TestX", "test_y", "a-b")``; ``owner`` may be dotted."""
    owner = owner.rsplit(".", 1)[-1]
    function, bracket, rest = name.partition("[")
    if bracket and not rest.endswith("]"):
        raise ValueError(f"malformed test name {name!r}")
    return TestId(owner, function, rest[:-1] if bracket else "")


def _tokens(values: list[str]) -> Optional[re.Pattern]:
    """A pattern matching any of ``values`` as a whole ``-``-separated part of an id (longest first)."""
    if not values:
        return None
    alternatives = "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
    return re.compile(rf"(?:(?<=-)|^)(?:{alternatives})(?=-|$)")


_INDEXED = re.compile(rf"(?:(?<=-)|^)({'|'.join(INDEXED_ARGNAMES)})\d+(?=-|$)")


class Pairing:
    """Knows which ids are ours (and whose) and rewrites them to the control's key."""

    def __init__(self, method_keys: Optional[list[str]] = None) -> None:
        self.methods = {m.key: m for m in cases.methods(method_keys)}
        self._names = cases.name_pairs(list(self.methods))
        self._owners = {m.config: m.key for m in self.methods.values()}
        self._owners[cases.CONTROL_CONFIG] = CONTROL
        self._owner_re = _tokens(list(self._owners))
        self._name_re = {k: _tokens(list(names)) for k, names in self._names.items()}
        self._config_re = {k: _tokens([m.config]) for k, m in self.methods.items()}
        self._tuner_re = {k: _tokens([m.key]) for k, m in self.methods.items()}

    def method_of(self, params: str) -> Optional[str]:
        """``"lora_sb"`` etc. for our ids, :data:`CONTROL` for the control's, None for any other."""
        found = {self._owners[m.group(0)] for m in self._owner_re.finditer(params)}
        if len(found) > 1:
            raise ValueError(f"test id {params!r} names several configs: {sorted(found)}")
        return found.pop() if found else None

    def canonical(self, params: str, method: str) -> str:
        """``params`` in the control's spelling, with the dict-argument indices blanked."""
        if method != CONTROL:
            names = self._names[method]
            params = self._name_re[method].sub(lambda m: names[m.group(0)], params)
            params = self._config_re[method].sub(cases.CONTROL_CONFIG, params)
            params = self._tuner_re[method].sub(cases.CONTROL_TUNER, params)
        return _INDEXED.sub(r"\1#", params)

    def key(self, test: TestId) -> Optional[tuple[str, tuple[str, str, str]]]:
        """``(method, key)`` for our or the control's tests, None for the others."""
        method = self.method_of(test.params)
        if method is None:
            return None
        return method, (test.owner, test.function, self.canonical(test.params, method))
