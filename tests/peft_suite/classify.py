"""Sort each of our test outcomes into one bucket, judged against the control's outcome of the same test."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from . import not_applicable
from .junit import FAILED, PASSED, Outcome
from .pairing import CONTROL, Pairing

# Buckets, in report order.
PASS = "passed"
GAP = "failed_where_control_passes"  # what the lead must fix
NOT_APPLICABLE = "not_applicable"  # declared in not_applicable.py, with its reason
CONTROL_TOO = "control_too"  # we fail or skip, and the control also fails or skips
SKIPPED_ONLY_US = "skipped_where_control_passes"  # PEFT's test skipped itself for us only
UNPAIRED = "unpaired"  # no control test with the same key: a harness problem
BUCKETS = (PASS, GAP, NOT_APPLICABLE, CONTROL_TOO, SKIPPED_ONLY_US, UNPAIRED)


@dataclass(frozen=True)
class Entry:
    id: str  # ``Owner::test_x[params]``
    status: str  # ours: passed / failed / skipped
    message: str  # first line of our error or skip reason
    control_id: Optional[str] = None
    control_status: Optional[str] = None
    control_message: str = ""
    reason: str = ""  # the declared not-applicable reason

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass
class MethodResult:
    method: str
    buckets: dict[str, list[Entry]] = field(default_factory=lambda: {b: [] for b in BUCKETS})

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.buckets.values())

    def counts(self) -> dict[str, int]:
        return {b: len(v) for b, v in self.buckets.items()}


def _bucket(ours: Outcome, control: Optional[Outcome], reason: Optional[str]) -> str:
    if ours.status == PASSED:
        return PASS
    if control is None:
        return UNPAIRED
    if control.status != PASSED:
        return CONTROL_TOO
    if reason is not None:
        return NOT_APPLICABLE
    return GAP if ours.status == FAILED else SKIPPED_ONLY_US


def classify(
    outcomes: list[Outcome],
    pairing: Pairing,
    table: tuple[not_applicable.NotApplicable, ...] = not_applicable.NOT_APPLICABLE,
) -> tuple[dict[str, MethodResult], Counter]:
    """``({method: MethodResult}, Counter of the control's statuses)``; other tests are ignored."""
    control: dict[tuple, Outcome] = {}
    ours: list[tuple[str, tuple, Outcome]] = []
    for outcome in outcomes:
        found = pairing.key(outcome.test)
        if found is None:
            continue
        method, key = found
        if method == CONTROL:
            control[key] = outcome
        else:
            ours.append((method, key, outcome))
    results = {m: MethodResult(m) for m in pairing.methods}
    for method, key, outcome in ours:
        partner = control.get(key)
        reason = not_applicable.reason_for(method, outcome.test, table)
        bucket = _bucket(outcome, partner, reason)
        entry = Entry(
            id=str(outcome.test),
            status=outcome.status,
            message=outcome.message,
            control_id=str(partner.test) if partner else None,
            control_status=partner.status if partner else None,
            control_message=partner.message if partner else "",
            reason=reason if bucket == NOT_APPLICABLE else "",
        )
        results[method].buckets[bucket].append(entry)
    return results, Counter(o.status for o in control.values())


def group_by_message(entries: list[Entry]) -> dict[str, list[str]]:
    """``{first error line: [ids]}``, the most frequent cause first."""
    groups: dict[str, list[str]] = {}
    for entry in entries:
        groups.setdefault(entry.message or "(no message)", []).append(entry.id)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))
