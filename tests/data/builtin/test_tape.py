"""The parse tape refuses to read a pick whose options are not prefix-free."""

from __future__ import annotations

import pytest

from tinyllm.data.builtin.tape import AmbiguityError, ParseTape


def test_parse_tape_refuses_options_that_are_not_prefix_free():
    with pytest.raises(AmbiguityError):
        ParseTape("ball.").uniform([" ball", "ball", "balloon"])
    assert ParseTape("ball.").uniform(["box", "ball"]) == 1
