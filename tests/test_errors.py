"""gradsweep.errors.first_line: the one way an error becomes one line of a report."""
from __future__ import annotations

import pytest

from gradsweep.errors import first_line

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("error, kwargs, expected", [
    (ValueError("bad value\nsecond line"), {}, "bad value"),
    (ValueError("\n  indented first\nsecond"), {}, "indented first"),  # leading blank lines are not the message
    (KeyError(), {}, "KeyError"),  # no message: the type names it
    (RuntimeError(""), {"default": ""}, ""),
    (OSError("x" * 500), {"limit": 300}, "x" * 300),
])
def test_first_line(error, kwargs, expected):
    assert first_line(error, **kwargs) == expected
