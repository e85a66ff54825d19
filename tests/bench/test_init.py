"""Every benchmark flag that takes a list (--cores, --batch-sizes, --concurrency) reads it the same way."""

from __future__ import annotations

import pytest

from tinyllm.bench import positive_ints
from tinyllm.errors import UserError


@pytest.mark.parametrize("text, values", [("1,8,32", [1, 8, 32]), ("4", [4]), (" 1, 2 ,", [1, 2])])
def test_comma_separated_positive_counts_are_read_in_order(text, values):
    assert positive_ints("--cores", text, "counts", "1,2") == values


@pytest.mark.parametrize("text", ["", ",", "0,8", "1,-2", "one", "1.5"])
def test_anything_else_is_refused_naming_the_flag_and_an_example(text):
    with pytest.raises(UserError, match=f"^--concurrency {text}: give comma-separated positive client counts, "
                                        "e.g. 1,8,32$"):
        positive_ints("--concurrency", text, "client counts", "1,8,32")
