"""pytest plugin (``-p peft_suite.plugin``): run only our tests and the control's tests they pair with.

A hook wrapper around ``pytest_collection_modifyitems``: before the other hooks it keeps our items and
the control items that have a partner among them; after them (``-k`` applies there, to both sides) it
puts back the control partner of every surviving item of ours, so a ``-k`` that names only our side
(``-k LoraSB``) still runs the control.
"""

from __future__ import annotations

import pytest

from .pairing import CONTROL, Pairing, split_name


def _key(pairing: Pairing, item: pytest.Item):
    owner = item.cls.__name__ if item.cls is not None else item.module.__name__
    return pairing.key(split_name(owner, item.name))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(session, config, items):
    pairing = Pairing()
    keyed = [(item, _key(pairing, item)) for item in items]
    our_keys = {found[1] for _, found in keyed if found is not None and found[0] != CONTROL}
    paired = [(it, found) for it, found in keyed if found and (found[0] != CONTROL or found[1] in our_keys)]
    dropped = [it for it, found in keyed if not (found and (found[0] != CONTROL or found[1] in our_keys))]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = [it for it, _ in paired]

    result = yield  # the other hooks, -k among them

    surviving = set(items)
    wanted = {found[1] for it, found in paired if found[0] != CONTROL and it in surviving}
    items[:] = [
        it
        for it, found in paired
        if (found[0] != CONTROL and it in surviving) or (found[0] == CONTROL and found[1] in wanted)
    ]
    return result
