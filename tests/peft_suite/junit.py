"""Read pytest's ``--junitxml`` output: one :class:`Outcome` per test case."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from .pairing import TestId, split_name

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
_RANK = {PASSED: 0, SKIPPED: 1, FAILED: 2}


class Outcome(NamedTuple):
    test: TestId
    status: str  # PASSED, FAILED (a failure or an error, setup and teardown included) or SKIPPED
    message: str  # first line of the error or of the skip reason ("" when passed)


def first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _outcome(case: ET.Element) -> tuple[str, str]:
    status, message = PASSED, ""
    for child in case:
        if child.tag in ("failure", "error"):
            kind = FAILED
        elif child.tag == "skipped":
            kind = SKIPPED
        else:
            continue
        if _RANK[kind] > _RANK[status]:
            text = child.get("message") or child.text or ""
            status, message = kind, first_line(text)
    return status, message


def read(path: Path | str) -> list[Outcome]:
    """Every ``<testcase>`` of a junit XML file (a collection error comes back as a failed pseudo-test)."""
    outcomes = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = _outcome(case)
        outcomes.append(Outcome(split_name(case.get("classname", ""), case.get("name", "")), status, message))
    return outcomes
