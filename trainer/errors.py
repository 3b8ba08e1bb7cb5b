"""The errors a user sees as one line (no traceback), and the hint that goes with a misspelt name.

`ConfigError` is a curriculum problem (its message names the file and the dotted field); the data
loader's `DataError` names the source and file. `did_you_mean` lives here, below both the config and
the model zoo, so that each can name the closest valid choice without importing the other.
"""
from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A curriculum problem; the message names the file and the field."""


def did_you_mean(word, choices, n: int = 1) -> str:
    """" (did you mean 'x'?)" naming the closest of `choices` (up to n), or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
