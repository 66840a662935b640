"""tools/mutations.py's list of deliberate breaks still fits the code: each break's text is in its file
exactly once, and each test it names exists (CI runs the breaks themselves, after the suite)."""

import re
from pathlib import Path

import pytest

from tools.mutations import BREAKS

REPO = Path(__file__).resolve().parent.parent


def test_break_names_are_unique():
    names = [b.name for b in BREAKS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("item", BREAKS, ids=lambda b: b.name)
def test_each_break_still_applies_and_names_existing_tests(item):
    text = (REPO / item.path).read_text(encoding="utf-8")
    assert text.count(item.original) == 1, f"{item.path} no longer holds {item.original!r} exactly once"
    assert item.broken != item.original
    for test in item.tests:
        path, _, name = test.partition("::")
        source = (REPO / path).read_text(encoding="utf-8")
        if name:
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", source, re.M), f"{test} does not exist"
